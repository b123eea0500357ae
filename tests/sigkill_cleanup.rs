//! Clients killed with SIGKILL leave their socket
//! and `.pid`; others clean up after them.

#[macro_use]
mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;

use common::{ROLE_ENV, TestRoute, backend_from_env, backend_name, helper_command};
use ipcm::{BackendChoice, Client, Info, Options};

/// Helper process: registers a client, then dies by SIGKILL (no cleanup).
#[test]
#[ignore = "helper process entry, run by the tests of this file"]
fn helper_process_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    assert_eq!(role, "register_and_die");
    let info = Info::parse(&std::env::var("IPCM_INFO").unwrap()).unwrap();
    let id = std::env::var("IPCM_ID").unwrap();
    let opts = Options::new().backend(backend_from_env());
    let client = Client::connect(&info, &id, opts).unwrap();
    std::mem::forget(client);
    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL)
        .unwrap();
    unreachable!("SIGKILL returned");
}

fn kill_child(t: &TestRoute, id: &str) {
    let status = helper_command("register_and_die")
        .env("IPCM_INFO", t.info().to_info_string())
        .env("IPCM_ID", id)
        .env("IPCM_TEST_BACKEND", backend_name(t.backend))
        .status()
        .unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "helper must die by SIGKILL: {status:?}"
    );
}

per_backend!(
    killed_client_leaves_socket_and_pid,
    new_client_takes_over_a_dead_id,
    peer_left_reaps_dead_client,
    peers_skip_dead_clients,
    live_pid_blocks_registration_and_route_is_untouched,
    sending_to_dead_listener_is_connection_refused,
);

fn killed_client_leaves_socket_and_pid(b: BackendChoice) {
    let t = TestRoute::new(b);
    kill_child(&t, "victim");
    assert!(t.file("victim").exists());
    assert!(t.file("victim.pid").exists());
    assert!(!t.file("victim.stats").exists());
}

fn new_client_takes_over_a_dead_id(b: BackendChoice) {
    let t = TestRoute::new(b);
    kill_child(&t, "victim");
    let mut c = t.connect("victim");
    assert_eq!(c.id(), "victim");
    assert_eq!(
        fs::read_to_string(t.file("victim.pid")).unwrap(),
        std::process::id().to_string()
    );
    c.disconnect(None).unwrap();
}

fn peer_left_reaps_dead_client(b: BackendChoice) {
    let t = TestRoute::new(b);
    let observer = t.connect("observer");
    kill_child(&t, "doomed");
    assert!(t.file("doomed").exists());
    assert!(t.file("doomed.pid").exists());
    assert_eq!(observer.peer_left().unwrap(), 1);
    assert!(!t.file("doomed").exists());
    assert!(!t.file("doomed.pid").exists());
    assert!(t.file("observer").exists(), "the live client is untouched");
}

fn peers_skip_dead_clients(b: BackendChoice) {
    let t = TestRoute::new(b);
    let obs = t.connect("obs");
    let _live = t.connect("live");
    kill_child(&t, "dead");
    assert_eq!(obs.peers().unwrap(), ["live"]);
    // Still "exists" until reaped (no liveness check there).
    assert!(obs.peer_exists("dead").unwrap().is_some());
}

fn live_pid_blocks_registration_and_route_is_untouched(b: BackendChoice) {
    let t = TestRoute::new(b);
    fs::write(t.file("foreign"), "").unwrap();
    fs::write(t.file("foreign.pid"), std::process::id().to_string()).unwrap();
    let err = Client::connect(&t.info(), "foreign", t.opts()).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(
        err.to_string(),
        "foreign UNIX Socket or marker file already exists"
    );
    // Q2: a failed registration removes nothing.
    assert!(t.file("foreign").exists());
    assert!(t.file("foreign.pid").exists());
    assert!(!t.file("foreign.stats").exists());
}

fn sending_to_dead_listener_is_connection_refused(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    kill_child(&t, "gone");
    let err = a.send_message("gone", "x").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "Cannot connect to '{}': Connection refused",
            t.file("gone").display()
        )
    );
    assert!(!a.has_connection("gone"));
}
