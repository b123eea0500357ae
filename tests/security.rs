//! Security rules (SECURITY.md): private routes, no symlink redirection,
//! peer credentials checked on accept. Each runs once per backend.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{ROLE_ENV, TestRoute, drain_for, helper_command};
use ipcm::{BackendChoice, Client, Error};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn frame(payload: &str) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload.as_bytes());
    v
}

/// Helper process: drops to uid `nobody`, connects to `IPCM_SOCKET`, says
/// hello and sends one message, then reports whether the listener closed
/// the connection ("closed") or kept it ("open").
#[test]
#[ignore = "helper process entry, run by the tests of this file"]
fn helper_process_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    assert_eq!(role, "connect_as_nobody");
    let path = std::env::var("IPCM_SOCKET").unwrap();
    // SAFETY: plain syscalls changing this (single-purpose) process's ids.
    unsafe {
        assert_eq!(libc::setgid(NOBODY), 0);
        assert_eq!(libc::setuid(NOBODY), 0);
    }
    let mut s = UnixStream::connect(&path).unwrap();
    let wrote = s
        .write_all(&frame(r#"{"hello":"intruder"}"#))
        .and_then(|()| {
            s.write_all(&frame(
                r#"{"from":"intruder","to":"srv","content":"sneaky"}"#,
            ))
        });
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 1];
    let verdict = match (wrote, s.read(&mut buf)) {
        // The listener closed first: writes hit EPIPE, reads see EOF.
        (Err(_), _) | (_, Ok(0)) => "closed",
        (_, Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => "closed",
        _ => "open",
    };
    println!("verdict={verdict}");
}

per_backend!(
    route_of_another_user_is_refused,
    writable_route_is_refused_unless_trusted,
    planted_symlink_cannot_redirect_sidecar_writes,
    other_users_are_refused_on_accept_unless_allowed,
);

fn route_of_another_user_is_refused(b: BackendChoice) {
    if !is_root() {
        eprintln!("skipped: changing a directory's owner needs root");
        return;
    }
    let t = TestRoute::new(b);
    std::os::unix::fs::chown(t.route.path(), Some(NOBODY), None).unwrap();
    let err = Client::connect(&t.info(), "a", t.opts()).unwrap_err();
    assert!(matches!(err, Error::InsecureRoute { .. }), "{err}");
    assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    assert!(!t.file("a").exists(), "nothing created");
    let c = Client::connect(&t.info(), "a", t.opts().trust_route(true)).unwrap();
    assert!(c.listen());
}

fn writable_route_is_refused_unless_trusted(b: BackendChoice) {
    let t = TestRoute::new(b);
    for mode in [0o777, 0o770, 0o702] {
        std::fs::set_permissions(t.route.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        let err = Client::connect(&t.info(), "a", t.opts()).unwrap_err();
        assert!(
            err.to_string().contains("lets other users write to it"),
            "{mode:o}: {err}"
        );
    }
    std::fs::set_permissions(t.route.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    drop(Client::connect(&t.info(), "ok", t.opts()).unwrap());
    std::fs::set_permissions(t.route.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    drop(Client::connect(&t.info(), "trusted", t.opts().trust_route(true)).unwrap());
}

fn planted_symlink_cannot_redirect_sidecar_writes(b: BackendChoice) {
    let t = TestRoute::new(b);
    let victim = t.dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    // A symlink where the pid file's temporary name will be.
    std::os::unix::fs::symlink(&victim, t.file("a.pid.pend")).unwrap();
    let err = Client::connect(&t.info(), "a", t.opts()).unwrap_err();
    assert!(
        err.to_string().starts_with("Could not open pidfile"),
        "{err}"
    );
    assert!(
        !t.file("a").exists(),
        "a failed registration leaves nothing behind"
    );
    // A symlink where the stats file goes.
    std::os::unix::fs::symlink(&victim, t.file("b.stats")).unwrap();
    let mut c = Client::connect(&t.info(), "b", t.opts()).unwrap();
    let err = c.disconnect(None).unwrap_err();
    assert!(
        err.to_string().starts_with("Could not open stats file"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}

fn verdict(t: &TestRoute) -> String {
    let out = helper_command("connect_as_nobody")
        .env("IPCM_SOCKET", t.file("srv"))
        .stdout(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("verdict="))
        .unwrap_or("none")
        .to_string()
}

fn other_users_are_refused_on_accept_unless_allowed(b: BackendChoice) {
    if !is_root() {
        eprintln!("skipped: connecting as another user needs root");
        return;
    }
    for (allow, want) in [(false, "closed"), (true, "open")] {
        let t = TestRoute::new(b);
        // Let uid nobody reach the socket: search on the route, write on the
        // socket file.
        std::fs::set_permissions(t.route.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let opts = if allow {
            t.opts().allow_uid(NOBODY)
        } else {
            t.opts()
        };
        let mut srv = Client::connect(&t.info(), "srv", opts).unwrap();
        std::fs::set_permissions(t.file("srv"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let pump = std::thread::spawn(move || {
            let got = drain_for(&mut srv, Duration::from_millis(1500));
            (got.len(), srv)
        });
        assert_eq!(verdict(&t), want, "allow_uid: {allow}");
        let (got, _srv) = pump.join().unwrap();
        assert_eq!(got, usize::from(allow), "allow_uid: {allow}");
    }
}
