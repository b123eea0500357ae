//! The `ipcm` command, driven as a user's script would drive it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

fn ipcm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ipcm"));
    c.env_remove("IPCM_BACKEND");
    c
}

struct Bus {
    dir: tempfile::TempDir,
    info: String,
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = ipcm().args(["unspawn", &self.info, "--force"]).output();
    }
}

fn spawn_bus(serializer: &str) -> Bus {
    let dir = tempfile::Builder::new()
        .prefix("ipcm")
        .tempdir_in("/tmp")
        .unwrap();
    let out = ipcm()
        .args(["spawn", "--serializer", serializer])
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let info = String::from_utf8(out.stdout).unwrap().trim().to_string();
    Bus { dir, info }
}

fn route_of(info: &str) -> String {
    let v: Value = serde_json::from_str(info).unwrap();
    v[2].as_str().unwrap().to_string()
}

/// Starts `ipcm recv` and waits for its "ready".
fn start_recv(bus: &Bus, id: &str, extra: &[&str]) -> Child {
    let mut child = ipcm()
        .args(["recv", &bus.info, "--id", id])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "recv said {line:?}");
    // Keep draining stderr so the child never blocks on it.
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = err.read_to_string(&mut rest);
    });
    child
}

fn finish(child: Child) -> (i32, Vec<Value>) {
    let out = child.wait_with_output().unwrap();
    let msgs = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (out.status.code().unwrap_or(-1), msgs)
}

/// `ipcm stats` of client `id`, parsed.
fn stats_of(bus: &Bus, id: &str) -> Value {
    let out = ipcm()
        .args(["stats", &bus.info, "--id", id])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn send(bus: &Bus, id: &str, to: &[&str], contents: &[&str]) -> Output {
    ipcm()
        .args(["send", &bus.info, "--id", id])
        .args(to)
        .args(contents)
        .output()
        .unwrap()
}

fn assert_clean_error(out: &Output, contains: &str) {
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {err:?}");
    assert!(lines[0].starts_with("ipcm: "), "{err:?}");
    assert!(lines[0].contains(contains), "{err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("Error {") && !err.contains("RUST_BACKTRACE")
    );
}

#[test]
fn spawn_prints_info_and_creates_private_route_under_tmpdir() {
    for (ser, class) in [
        ("json", r#""IPC::Manager::Serializer::JSON""#),
        ("json-zstd", r#""IPC::Manager::Serializer::JSON::Zstd""#),
        ("binary", r#""+ipcm::Serializer::Binary""#),
    ] {
        let bus = spawn_bus(ser);
        let route = route_of(&bus.info);
        assert_eq!(
            bus.info,
            format!(r#"["IPC::Manager::Client::ConnectionUnix",{class},"{route}"]"#)
        );
        assert!(
            route.starts_with(bus.dir.path().to_str().unwrap()),
            "{route}"
        );
        let name = std::path::Path::new(&route)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(name.starts_with("PerlIPCManager-"), "{name}");
        let mode = std::fs::metadata(&route).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0);
    }
}

#[test]
fn send_recv_round_trip_with_rich_content() {
    let bus = spawn_bus("json");
    let child = start_recv(&bus, "sink", &["--count", "3", "--timeout", "20"]);
    let big = json!({"blob": "é".repeat(1 << 19), "n": [1, {"deep": [[[]]]}]});
    let big_text = big.to_string();
    assert!(big_text.len() >= 1 << 20);
    // Too large for an argument: the 1 MiB text goes through stdin ("-").
    let mut s = ipcm()
        .args([
            "send",
            &bus.info,
            "--id",
            "src",
            "--to",
            "sink",
            r#"{"a":"trés 😀"}"#,
            "[1,2.5,null]",
            "-",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = s.stdin.take().unwrap();
    stdin.write_all(big_text.as_bytes()).unwrap();
    stdin.write_all(b"\n").unwrap();
    drop(stdin);
    let out = s.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, msgs) = finish(child);
    assert_eq!(code, 0);
    assert_eq!(msgs.len(), 3);
    assert_eq!(msgs[0]["content"], json!({"a": "trés 😀"}));
    assert_eq!(msgs[1]["content"], json!([1, 2.5, null]));
    assert_eq!(msgs[2]["content"], big);
    for m in &msgs {
        assert_eq!(m["from"], "src");
        assert_eq!(m["to"], "sink");
        assert_eq!(m["id"].as_str().unwrap().len(), 36);
        assert!(m["stamp"].as_f64().unwrap() > 1e9);
        assert!(m["stamp_ord"].is_u64());
        assert!(m.get("broadcast").is_none());
    }
    // Both sides disconnected cleanly: sockets gone, .stats written.
    let route = route_of(&bus.info);
    assert!(!std::path::Path::new(&format!("{route}/sink")).exists());
    let stats = stats_of(&bus, "sink");
    assert_eq!(stats["read"]["src"], 3);
    let stats = stats_of(&bus, "src");
    assert_eq!(stats["sent"]["sink"], 3);
}

#[test]
fn hashed_ids_and_every_serializer() {
    let long = "x".repeat(120);
    for ser in ["json", "json-zstd", "binary"] {
        let bus = spawn_bus(ser);
        for (to, from) in [("has/slash", long.as_str()), (long.as_str(), "has/slash")] {
            let child = start_recv(&bus, to, &["--count", "1", "--timeout", "20"]);
            let out = send(&bus, from, &["--to", to], &[r#"{"k":"v"}"#]);
            assert!(
                out.status.success(),
                "{ser}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (code, msgs) = finish(child);
            assert_eq!(code, 0, "{ser}");
            assert_eq!(msgs[0]["from"], from, "{ser}");
            assert_eq!(msgs[0]["to"], to, "{ser}");
            assert_eq!(msgs[0]["content"], json!({"k": "v"}));
        }
    }
}

#[test]
fn broadcast_reaches_every_listener() {
    let bus = spawn_bus("json");
    let a = start_recv(&bus, "a", &["--count", "1", "--timeout", "20"]);
    let b = start_recv(&bus, "b", &["--count", "1", "--timeout", "20"]);
    let out = send(&bus, "src", &["--broadcast"], &[r#"{"all":true}"#]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for child in [a, b] {
        let (code, msgs) = finish(child);
        assert_eq!(code, 0);
        assert_eq!(msgs[0]["content"], json!({"all": true}));
        assert_eq!(msgs[0]["broadcast"], 1);
    }
}

#[test]
fn stdin_contents_are_sent_in_order() {
    let bus = spawn_bus("json");
    let child = start_recv(&bus, "sink", &["--count", "3", "--timeout", "20"]);
    let mut s = ipcm()
        .args(["send", &bus.info, "--id", "src", "--to", "sink", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    s.stdin
        .take()
        .unwrap()
        .write_all(b"1\n\"two\"\n{\"three\":3}\n")
        .unwrap();
    assert!(s.wait().unwrap().success());
    let (_, msgs) = finish(child);
    let got: Vec<Value> = msgs.iter().map(|m| m["content"].clone()).collect();
    assert_eq!(got, [json!(1), json!("two"), json!({"three": 3})]);
}

#[test]
fn recv_exit_codes_follow_count_and_timeout() {
    let bus = spawn_bus("json");
    let started = std::time::Instant::now();
    let (code, msgs) = finish(start_recv(
        &bus,
        "r1",
        &["--count", "1", "--timeout", "0.3"],
    ));
    assert_eq!(code, 1, "count not reached before the timeout");
    assert!(msgs.is_empty());
    assert!(started.elapsed() < Duration::from_secs(10));
    let (code, _) = finish(start_recv(&bus, "r2", &["--timeout", "0.3"]));
    assert_eq!(code, 0, "no count: the timeout is the normal end");
}

#[test]
fn send_errors_are_one_clean_line() {
    let bus = spawn_bus("json");
    assert_clean_error(
        &send(&bus, "src", &["--to", "nobody"], &["1"]),
        "'nobody' is not a valid message recipient",
    );
    assert_clean_error(
        &send(&bus, "src", &["--to", "x"], &["{bad"]),
        "is not valid JSON",
    );
    // A non-listening peer without a connection.
    let route = route_of(&bus.info);
    std::fs::write(format!("{route}/quiet"), "").unwrap();
    assert_clean_error(
        &send(&bus, "src", &["--to", "quiet"], &["1"]),
        "no active connection to 'quiet' and peer is not listening",
    );
    assert_clean_error(
        &ipcm().args(["peers", "[1,2"]).output().unwrap(),
        "invalid info string",
    );
    assert_clean_error(
        &ipcm()
            .args(["stats", &bus.info, "--id", "never"])
            .output()
            .unwrap(),
        "Could not open stats file: No such file or directory",
    );
}

#[test]
fn peers_lists_live_clients_sorted() {
    let bus = spawn_bus("json");
    let b = start_recv(&bus, "b", &["--timeout", "20", "--count", "1"]);
    let a = start_recv(&bus, "a", &["--timeout", "20", "--count", "1"]);
    let out = ipcm().args(["peers", &bus.info]).output().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "a\nb\n");
    let out = ipcm()
        .args(["peers", &route_of(&bus.info), "--id", "a"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "b\n",
        "bare route path works too"
    );
    // unspawn refuses while they live, then --force removes everything.
    let out = ipcm().args(["unspawn", &bus.info]).output().unwrap();
    assert_clean_error(&out, "still has live clients (a, b)");
    assert!(send(&bus, "src", &["--broadcast"], &["0"]).status.success());
    finish(a);
    finish(b);
    let out = ipcm().args(["unspawn", &bus.info]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!std::path::Path::new(&route_of(&bus.info)).exists());
}

#[test]
fn peers_watch_prints_a_json_line_per_join_and_leave() {
    let bus = spawn_bus("json");
    let a = start_recv(&bus, "a", &["--timeout", "20", "--count", "1"]);
    let mut watch = ipcm()
        .args(["peers", &bus.info, "--watch"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    // The sender "src" comes and goes too (seen or not, depending on the
    // rescans' timing): only a and b are followed.
    let mut next = || -> Value {
        loop {
            let v: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            if v["id"] != "src" {
                return v;
            }
        }
    };
    assert_eq!(
        next(),
        json!({"event": "joined", "id": "a"}),
        "present first"
    );
    let b = start_recv(&bus, "b", &["--timeout", "20", "--count", "1"]);
    assert_eq!(next(), json!({"event": "joined", "id": "b"}));
    assert!(send(&bus, "src", &["--to", "a"], &["0"]).status.success());
    finish(a);
    assert_eq!(next(), json!({"event": "left", "id": "a"}));
    assert!(send(&bus, "src", &["--to", "b"], &["0"]).status.success());
    finish(b);
    assert_eq!(next(), json!({"event": "left", "id": "b"}));
    // The route removed: the watch ends by itself.
    let out = ipcm().args(["unspawn", &bus.info]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let status = watch.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn unspawn_force_and_missing_route() {
    let bus = spawn_bus("json");
    let child = start_recv(&bus, "stay", &["--timeout", "1"]);
    let out = ipcm()
        .args(["unspawn", &bus.info, "--force"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!std::path::Path::new(&route_of(&bus.info)).exists());
    finish(child);
    assert_clean_error(
        &ipcm().args(["unspawn", &bus.info]).output().unwrap(),
        "does not exist",
    );
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "spawn", "unspawn", "recv", "send", "peers", "stats", "bench",
    ] {
        let out = ipcm().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Usage: ipcm"), "{sub}: {text}");
        assert!(text.lines().count() > 5, "{sub}: {text}");
    }
    let out = ipcm().arg("--help").output().unwrap();
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("IPC::Manager")
    );
    let out = ipcm().arg("frobnicate").output().unwrap();
    assert!(!out.status.success());
}

/// Runs `ipcm bench --json` with `args`: its first round's object.
fn first_bench_round(args: &[&str]) -> Value {
    let out = ipcm()
        .args(["bench", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

#[test]
fn bench_reports_throughput_and_round_trips_labelled_with_backend_and_serializer() {
    let first = first_bench_round(&[
        "--messages",
        "3000",
        "--round-trips",
        "200",
        "--size",
        "64",
        "--backend",
        "epoll",
        "--queueing-latency",
    ]);
    assert_eq!(first["backend"], "epoll");
    assert_eq!(first["serializer"], "Binary");
    assert_eq!(first["messages"], 3000);
    assert!(first["throughput"]["msgs_per_sec"].as_f64().unwrap() > 0.0);
    for mode in ["blocking", "busy_poll"] {
        let rt = &first["round_trip_us"][mode];
        assert_eq!(
            rt["samples"], 200,
            "{mode}: the warm-up tenth is not sampled"
        );
        let p50 = rt["p50"].as_f64().unwrap();
        assert!(p50 > 0.0, "{mode}");
        assert!(rt["p99"].as_f64().unwrap() >= p50, "{mode}");
        assert!(rt["p999"].as_f64().unwrap() >= rt["p99"].as_f64().unwrap());
    }
    let q = &first["queueing_latency_under_load_us"];
    assert_eq!(q["samples"], 3000);
    for m in ["throughput", "blocking", "busy_poll"] {
        let path = first["path"][m].as_str().unwrap();
        assert!(
            ["socket", "shared-memory lane"].contains(&path),
            "{m}: {path}"
        );
    }
    // With the lane off every measurement says it took the socket.
    let first = first_bench_round(&[
        "--messages",
        "3000",
        "--round-trips",
        "100",
        "--backend",
        "epoll",
        "--lane",
        "off",
    ]);
    for m in ["throughput", "blocking", "busy_poll"] {
        assert_eq!(first["path"][m], "socket", "{m}");
    }
    let text = short_bench(&["--serializer", "json"]);
    assert!(text.contains("JSON serializer"), "{text}");
    assert!(
        text.contains("throughput") && text.contains("msgs/s"),
        "{text}"
    );
    assert!(
        text.contains(
            "round trip, unloaded ping-pong, blocking waits (spin 20 us, then sleep): p50"
        ) && text.contains("round trip, unloaded ping-pong, busy polling:")
            && text.contains("p99.9"),
        "{text}"
    );
    assert!(
        !text.contains("queueing"),
        "queueing latency only when asked for"
    );
    assert!(
        !text.contains('\r'),
        "no progress bar when stdout is not a terminal"
    );
    // Waits that sleep at once say so.
    let text = short_bench(&["--spin-before-sleep-us", "0"]);
    assert!(
        text.contains("blocking waits (spin 0 us, then sleep): p50"),
        "{text}"
    );
}

/// The text of a short `ipcm bench` run (2,000 messages, 100 round trips)
/// with `extra` arguments; the run must succeed.
fn short_bench(extra: &[&str]) -> String {
    let out = ipcm()
        .args(["bench", "--messages", "2000", "--round-trips", "100"])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn recv_threaded_prints_in_order_and_follows_the_exit_codes_on_each_backend() {
    for backend in ["epoll", "io_uring"] {
        if backend == "io_uring"
            && let Err(reason) = ipcm::io_uring_available()
        {
            eprintln!("skipped: io_uring unavailable ({reason})");
            continue;
        }
        let bus = spawn_bus("json");
        let child = start_recv(
            &bus,
            "sink",
            &[
                "--threaded",
                "--backend",
                backend,
                "--count",
                "3",
                "--timeout",
                "20",
            ],
        );
        let out = send(
            &bus,
            "src",
            &["--to", "sink"],
            &["1", "\"two\"", "{\"three\":3}"],
        );
        assert!(out.status.success(), "{out:?}");
        let (code, msgs) = finish(child);
        assert_eq!(code, 0, "{backend}");
        let got: Vec<Value> = msgs.iter().map(|m| m["content"].clone()).collect();
        assert_eq!(
            got,
            [json!(1), json!("two"), json!({"three": 3})],
            "{backend}"
        );
        assert!(msgs.iter().all(|m| m["from"] == "src" && m["to"] == "sink"));
        // Disconnected cleanly: socket gone, .stats written.
        let route = route_of(&bus.info);
        assert!(!std::path::Path::new(&format!("{route}/sink")).exists());
        let stats = stats_of(&bus, "sink");
        assert_eq!(stats["read"]["src"], 3, "{backend}");
        let (code, msgs) = finish(start_recv(
            &bus,
            "idle",
            &[
                "--threaded",
                "--backend",
                backend,
                "--count",
                "1",
                "--timeout",
                "0.3",
            ],
        ));
        assert_eq!(code, 1, "{backend}: count not reached before the timeout");
        assert!(msgs.is_empty());
    }
}
