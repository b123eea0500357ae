//! Every serializer end to end, on each backend: messages, hellos,
//! broadcast, `.stats` and `.resume` files, and what a mismatch looks like.

#[macro_use]
mod common;

use std::time::Duration;

use common::{contents, poll};
use ipcm::{BackendChoice, Client, Info, Options, Route, Serializer};
use serde_json::json;

fn serializers() -> Vec<Serializer> {
    vec![
        Serializer::Json,
        Serializer::json_zstd().unwrap(),
        Serializer::Binary,
    ]
}

struct R {
    _dir: tempfile::TempDir,
    route: Route,
    info: Info,
    b: BackendChoice,
}

fn route(ser: Serializer, b: BackendChoice) -> R {
    let dir = tempfile::Builder::new()
        .prefix("ipcm")
        .tempdir_in("/tmp")
        .unwrap();
    let route = Route::spawn(Some(dir.path())).unwrap();
    let info = Info::new(ser, route.path());
    R {
        _dir: dir,
        route,
        info,
        b,
    }
}

impl R {
    fn connect(&self, id: &str) -> Client {
        Client::connect(&self.info, id, Options::new().backend(self.b)).unwrap()
    }
}

per_backend!(
    every_serializer_moves_rich_content,
    every_serializer_broadcasts_and_writes_stats,
    every_serializer_round_trips_the_resume_file,
    serializer_mismatch_drops_the_connection,
);

fn every_serializer_moves_rich_content(b: BackendChoice) {
    for ser in serializers() {
        let r = route(ser.clone(), b);
        let mut a = r.connect("a");
        let mut z = r.connect("has/slash");
        let big = "é".repeat(512 * 1024);
        let items = [
            json!("plain"),
            json!({"nested": {"list": [1, 2.5, "trés", null, true], "emoji": "😀"}}),
            json!(big),
            json!([[[[[]]]]]),
        ];
        // The sender queues (the receiver reads only afterwards in this
        // single thread), then both sides make progress together.
        a.set_send_blocking(false);
        for c in &items {
            a.send_message("has/slash", c).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < items.len() && std::time::Instant::now() < deadline {
            a.drain_pending();
            got.extend(z.get_messages_timeout(Duration::from_millis(10)).unwrap());
        }
        assert_eq!(contents(&got), items, "{ser:?}");
        assert_eq!(got[0].from(), "a");
        z.send_message("a", "back").unwrap();
        assert_eq!(contents(&poll(&mut a, 1)), [json!("back")], "{ser:?}");
    }
}

fn every_serializer_broadcasts_and_writes_stats(b: BackendChoice) {
    for ser in serializers() {
        let r = route(ser.clone(), b);
        let mut a = r.connect("a");
        let mut x = r.connect("x");
        let mut y = r.connect("y");
        let res = a.broadcast(&json!({"all": 1})).unwrap();
        assert!(res.values().all(|v| v.sent), "{ser:?}: {res:?}");
        for c in [&mut x, &mut y] {
            let m = poll(c, 1);
            assert!(m[0].is_broadcast());
            assert_eq!(m[0].content_value().unwrap(), json!({"all": 1}));
        }
        for mut c in [a, x, y] {
            c.disconnect(None).unwrap();
        }
        let stats = r.route.all_stats(&ser).unwrap();
        assert_eq!(stats["a"].sent["x"], 1, "{ser:?}");
        assert_eq!(stats["y"].read["a"], 1, "{ser:?}");
        let raw = std::fs::read(format!("{}/a.stats", r.route.path())).unwrap();
        match ser {
            Serializer::JsonZstd(_) => assert_eq!(&raw[..4], &[0x28, 0xB5, 0x2F, 0xFD]),
            _ => assert_eq!(raw[0], b'{'),
        }
    }
}

fn every_serializer_round_trips_the_resume_file(b: BackendChoice) {
    for ser in serializers() {
        let r = route(ser.clone(), b);
        let mut a = r.connect("a");
        let mut z = r.connect("z");
        let mut m = a.build_message("z", &json!({"k": "v"})).unwrap();
        m.set_extra("trace", &json!([1])).unwrap();
        a.send(&m).unwrap();
        let got = poll(&mut z, 1);
        z.requeue_message(&got).unwrap();
        let again = z.get_messages().unwrap();
        assert_eq!(again.len(), 1, "{ser:?}");
        assert_eq!(again[0].id(), m.id());
        assert_eq!(again[0].stamp(), m.stamp());
        assert_eq!(again[0].extra("trace"), Some("[1]"));
    }
}

fn serializer_mismatch_drops_the_connection(b: BackendChoice) {
    let r = route(Serializer::Binary, b);
    let mut srv = r.connect("srv");
    // A client that believes the route is JSON sends a JSON hello.
    let wrong = Info::new(Serializer::Json, r.route.path());
    let mut c = Client::connect(&wrong, "c", Options::new().backend(b).listen(false)).unwrap();
    c.send_message("srv", "x").unwrap();
    let got = common::drain_for(&mut srv, Duration::from_millis(200));
    assert!(got.is_empty());
    assert!(
        srv.connections().is_empty(),
        "bad hello closed the connection"
    );
}

#[test]
fn info_strings_name_each_serializer() {
    let zstd9 = Serializer::from_spec(&json!(["IPC::Manager::Serializer::JSON::Zstd", "level", 9]))
        .unwrap();
    let cases = [
        (Serializer::Json, r#""IPC::Manager::Serializer::JSON""#),
        (
            Serializer::json_zstd().unwrap(),
            r#""IPC::Manager::Serializer::JSON::Zstd""#,
        ),
        (
            zstd9,
            r#"["IPC::Manager::Serializer::JSON::Zstd","level",9]"#,
        ),
        (Serializer::Binary, r#""+ipcm::Serializer::Binary""#),
    ];
    for (ser, spec) in cases {
        let info = Info::new(ser.clone(), "/tmp/r");
        let text = info.to_info_string();
        assert_eq!(
            text,
            format!(r#"["IPC::Manager::Client::ConnectionUnix",{spec},"/tmp/r"]"#)
        );
        assert_eq!(Info::parse(&text).unwrap().serializer, ser);
    }
    assert!(Info::parse(r#"["ConnectionUnix","JSON::Zstd","/r"]"#).is_ok());
    assert!(Info::parse(r#"["ConnectionUnix",["JSON::Zstd","level","x"],"/r"]"#).is_err());
}
