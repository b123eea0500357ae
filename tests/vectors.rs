//! The bytes and files captured from the Perl implementation
//! (`../shared/vectors`), checked against ipcm.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;

use common::{TestRoute, poll, read_jsonl, vectors_dir};
use ipcm::on_disk_name;
use ipcm::{BackendChoice, Info, Serializer};
use serde_json::{Value, json};

#[test]
fn every_on_disk_name_matches_perl() {
    let rows = read_jsonl("on_disk_names.jsonl");
    assert!(rows.len() >= 40);
    for row in rows {
        let id = row["id"].as_str().unwrap();
        let route = row["route"].as_str().unwrap();
        assert_eq!(
            ipcm::max_on_disk_name_length(route),
            row["max"].as_i64().unwrap(),
            "budget of {route}"
        );
        assert_eq!(route.len() as u64, row["route_len"].as_u64().unwrap());
        match (on_disk_name(route, id), row["error"].as_str()) {
            (Ok(name), None) => assert_eq!(name, row["on_disk"].as_str().unwrap(), "id {id:?}"),
            (Err(e), Some(want)) => assert_eq!(e.to_string(), want, "id {id:?}"),
            (got, want) => panic!("id {id:?} route {route}: got {got:?}, Perl said {want:?}"),
        }
    }
}

#[test]
fn spawn_info_string_round_trips_exactly() {
    let text = fs::read_to_string(vectors_dir().join("spawn_info.txt")).unwrap();
    let info = Info::parse(&text).unwrap();
    assert_eq!(info.serializer, Serializer::Json);
    assert_eq!(info.route, "/tmp/PerlIPCManager-4242-abcdef");
    assert_eq!(info.to_info_string(), text.trim_end());
}

per_backend!(captured_frames_decode_exactly, route_layout_matches_perl);

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A raw socket replays the Perl sender's bytes to an ipcm listener: the
/// messages must come out exactly as Perl decoded them.
fn captured_frames_decode_exactly(b: BackendChoice) {
    let rows = read_jsonl("wire_capture.jsonl");
    let t = TestRoute::new(b);
    let mut sink = t.connect("sink");
    let mut raw = UnixStream::connect(t.file("sink")).unwrap();
    for row in &rows {
        let bytes = unhex(row["frame_hex"].as_str().unwrap());
        let payload = row["payload"].as_str().unwrap();
        assert_eq!(&bytes[4..], payload.as_bytes());
        assert_eq!(
            u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
            payload.len()
        );
        // Deliver in awkward pieces to exercise reassembly.
        for chunk in bytes.chunks(7) {
            raw.write_all(chunk).unwrap();
        }
    }
    // The first captured frame is the hello: ipcm's own is byte-identical.
    assert_eq!(rows[0]["decoded"], json!({"hello": "caller"}));
    let msgs = poll(&mut sink, rows.len() - 1);
    assert_eq!(msgs.len(), rows.len() - 1);
    let mut want: Vec<Value> = rows[1..].iter().map(|r| r["decoded"].clone()).collect();
    let mut got: Vec<Value> = msgs.iter().map(|m| m.to_value()).collect();
    let key = |v: &Value| v["id"].as_str().unwrap().to_string();
    want.sort_by_key(key);
    got.sort_by_key(key);
    assert_eq!(got, want);
    assert!(sink.has_connection("caller"));
    assert_eq!(sink.stats().read["caller"], 3);
}

fn file_rows(name: &str) -> BTreeMap<String, Value> {
    read_jsonl(name)
        .into_iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r))
        .collect()
}

/// Replays the capture scenario: a listener `listener` and a non-listener
/// `h-needs-hash`; one message, handed back with `requeue_message`.
fn route_layout_matches_perl(b: BackendChoice) {
    // The capture ran with umask 022; file modes depend on it.
    let old = set_umask(0o022);
    let t = TestRoute::new(b);
    let mut listener = t.connect("listener");
    let mut nl = t.connect_nl("h-needs-hash");
    nl.send_message("listener", &json!({"ping": 1})).unwrap();
    let msgs = poll(&mut listener, 1);
    assert_eq!(msgs.len(), 1);
    listener.requeue_message(&msgs).unwrap();
    let pid = std::process::id().to_string();

    let want = file_rows("route_layout.jsonl");
    let mut seen = BTreeMap::new();
    for entry in fs::read_dir(t.route.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let meta = fs::metadata(entry.path()).unwrap();
        let kind = if meta.file_type().is_socket() {
            "socket"
        } else {
            "file"
        };
        let mode = format!("{:04o}", meta.permissions().mode() & 0o777);
        seen.insert(name, (kind, mode, entry.path()));
    }
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "same names on disk"
    );
    for (name, row) in &want {
        let (kind, mode, path) = &seen[name];
        assert_eq!(*kind, row["kind"].as_str().unwrap(), "{name}");
        assert_eq!(mode, row["mode"].as_str().unwrap(), "mode of {name}");
        if *kind == "socket" {
            continue;
        }
        let got = fs::read(path).unwrap();
        let perl = unhex(row["content_hex"].as_str().unwrap());
        if name.ends_with(".pid") {
            assert_eq!(String::from_utf8(got).unwrap(), pid, "{name}");
        } else if name.ends_with(".resume") {
            // One record: u32 length + the message, fields as Perl wrote them
            // (id and stamp differ per run).
            for rec in [&got, &perl] {
                assert_eq!(
                    u32::from_be_bytes(rec[..4].try_into().unwrap()) as usize,
                    rec.len() - 4
                );
            }
            let strip = |v: &[u8]| {
                let mut v: Value = serde_json::from_slice(&v[4..]).unwrap();
                let o = v.as_object_mut().unwrap();
                assert!(o.remove("id").unwrap().as_str().unwrap().len() == 36);
                assert!(o.remove("stamp").unwrap().is_f64());
                v
            };
            assert_eq!(strip(&got), strip(&perl));
        } else {
            assert_eq!(got, perl, "{name}");
        }
    }

    // After disconnect (the requeued message consumed first, as in the
    // capture): what stays behind.
    let again = listener.get_messages().unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id(), msgs[0].id());
    listener.disconnect(None).unwrap();
    nl.disconnect(None).unwrap();
    let want = file_rows("route_after_disconnect.jsonl");
    let mut names: Vec<String> = fs::read_dir(t.route.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, want.keys().cloned().collect::<Vec<_>>());
    for (name, row) in &want {
        let got = fs::read_to_string(t.file(name)).unwrap();
        let perl = row["content"].as_str().unwrap();
        if name.ends_with(".pid") {
            assert_eq!(got, pid);
        } else if name.ends_with(".stats") {
            let g: Value = serde_json::from_str(&got).unwrap();
            let p: Value = serde_json::from_str(perl).unwrap();
            assert_eq!(g, p, "{name}");
        } else {
            assert_eq!(got, perl, "{name}");
        }
    }
    set_umask(old);
}

fn set_umask(mask: u32) -> u32 {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask)).as_raw_mode()
}
