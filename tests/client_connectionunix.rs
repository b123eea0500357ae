//! The Perl `Client-ConnectionUnix` unit tests, ported.
//! Each runs once per backend.

#[macro_use]
mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

use common::{TestRoute, contents, drain_for, poll};
use ipcm::internals::now_stamp;
use ipcm::{BackendChoice, Client};
use serde_json::json;

per_backend!(
    reports_viable_path_type_and_no_suspend,
    listener_creates_socket_and_reports_listen,
    disconnect_removes_socket,
    non_listener_creates_marker_file,
    two_listeners_see_each_other_as_listeners,
    message_arrives_with_from_to_and_content,
    sender_caches_connection_after_send,
    listener_and_non_listener_see_each_others_kind,
    non_listener_sends_to_listener_which_caches_it,
    listener_replies_over_inbound_connection,
    listener_cannot_send_to_unconnected_non_listener,
    messages_arrive_in_send_order,
    broadcast_reaches_every_listener,
    listener_has_select_handles,
    no_connection_before_traffic,
    both_sides_cache_one_connection,
    disconnect_connection_closes_it,
    send_after_disconnect_connection_reconnects,
    close_idle_connections_closes_idle_entry,
    broken_cached_socket_fails_next_send_then_recovers,
    stats_count_sent_and_read,
    peers_and_listening_peers,
    send_blocking_defaults,
    non_blocking_small_send_is_written_at_once,
    non_blocking_warm_up_leaves_empty_buffer,
    queued_frame_shows_in_outbox_queries_then_drains,
);

fn reports_viable_path_type_and_no_suspend(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut c = t.connect("v1");
    assert_eq!(c.path_type(), "UNIX Socket or marker file");
    assert!(!c.suspend_supported());
    assert_eq!(
        c.suspend().unwrap_err().to_string(),
        "suspend is not supported by the ConnectionUnix driver"
    );
}

fn listener_creates_socket_and_reports_listen(b: BackendChoice) {
    let t = TestRoute::new(b);
    let c = t.connect("cd1");
    assert_eq!(c.id(), "cd1");
    assert!(c.listen());
    assert!(fs::metadata(t.file("cd1")).unwrap().file_type().is_socket());
}

fn disconnect_removes_socket(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut c = t.connect("cd1");
    c.disconnect(None).unwrap();
    assert!(!t.file("cd1").exists());
    assert!(c.disconnected());
}

fn non_listener_creates_marker_file(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut c = t.connect_nl("nl1");
    let meta = fs::metadata(t.file("nl1")).unwrap();
    assert!(meta.file_type().is_file());
    assert!(!meta.file_type().is_socket());
    assert_eq!(meta.len(), 0);
    assert!(!c.listen());
    c.disconnect(None).unwrap();
    assert!(!t.file("nl1").exists());
}

fn two_listeners_see_each_other_as_listeners(b: BackendChoice) {
    let t = TestRoute::new(b);
    let a = t.connect("a");
    let bb = t.connect("b");
    assert!(a.peer_is_listener("b").unwrap());
    assert!(bb.peer_is_listener("a").unwrap());
}

fn message_arrives_with_from_to_and_content(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.send_message("b", &json!({"hello": "world"})).unwrap();
    let msgs = poll(&mut bb, 1);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].from(), "a");
    assert_eq!(msgs[0].to(), Some("b"));
    assert_eq!(msgs[0].content_value().unwrap(), json!({"hello": "world"}));
    assert!(drain_for(&mut bb, std::time::Duration::from_millis(100)).is_empty());
}

fn sender_caches_connection_after_send(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let _bb = t.connect("b");
    a.send_message("b", &json!({"hello": "world"})).unwrap();
    assert!(a.has_connection("b"));
}

fn listener_and_non_listener_see_each_others_kind(b: BackendChoice) {
    let t = TestRoute::new(b);
    let srv = t.connect("srv");
    let cli = t.connect_nl("cli");
    assert!(cli.peer_is_listener("srv").unwrap());
    assert!(!srv.peer_is_listener("cli").unwrap());
}

fn non_listener_sends_to_listener_which_caches_it(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut srv = t.connect("srv");
    let mut cli = t.connect_nl("cli");
    cli.send_message("srv", "ping").unwrap();
    let msgs = poll(&mut srv, 1);
    assert_eq!(contents(&msgs), [json!("ping")]);
    assert!(srv.has_connection("cli"));
}

fn listener_replies_over_inbound_connection(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut srv = t.connect("srv");
    let mut cli = t.connect_nl("cli");
    cli.send_message("srv", "ping").unwrap();
    assert_eq!(poll(&mut srv, 1).len(), 1);
    srv.send_message("cli", "pong").unwrap();
    let msgs = poll(&mut cli, 1);
    assert_eq!(contents(&msgs), [json!("pong")]);
}

fn listener_cannot_send_to_unconnected_non_listener(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let _nl = t.connect_nl("b");
    let err = a.send_message("b", "x").unwrap_err().to_string();
    assert!(
        err.contains("no active connection to 'b' and peer is not listening"),
        "{err}"
    );
}

fn messages_arrive_in_send_order(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    for m in ["first", "second", "third"] {
        a.send_message("b", m).unwrap();
    }
    let msgs = poll(&mut bb, 3);
    assert_eq!(
        contents(&msgs),
        [json!("first"), json!("second"), json!("third")]
    );
}

fn broadcast_reaches_every_listener(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut bc1 = t.connect("bc1");
    let mut bc2 = t.connect("bc2");
    let mut bc3 = t.connect("bc3");
    let res = bc1.broadcast(&json!({"mass": "msg"})).unwrap();
    assert_eq!(res.len(), 2);
    assert!(res["bc2"].sent && res["bc3"].sent);
    for c in [&mut bc2, &mut bc3] {
        let msgs = poll(c, 1);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].content_value().unwrap(), json!({"mass": "msg"}));
        assert!(msgs[0].is_broadcast());
    }
}

fn listener_has_select_handles(b: BackendChoice) {
    let t = TestRoute::new(b);
    let c = t.connect("a");
    assert!(c.have_handles_for_select());
    assert!(c.handles_for_select().as_raw_fd() >= 0);
}

fn no_connection_before_traffic(b: BackendChoice) {
    let t = TestRoute::new(b);
    let a = t.connect("a");
    let _bb = t.connect("b");
    assert!(!a.has_connection("b"));
    assert!(a.connections().is_empty());
}

fn both_sides_cache_one_connection(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.send_message("b", "hi").unwrap();
    assert_eq!(poll(&mut bb, 1).len(), 1);
    assert!(a.has_connection("b"));
    assert!(bb.has_connection("a"));
    assert_eq!(a.connections(), ["b"]);
    assert_eq!(bb.connections(), ["a"]);
    assert!(a.last_activity("b").unwrap() > 0.0);
}

fn disconnect_connection_closes_it(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.send_message("b", "hi").unwrap();
    assert_eq!(poll(&mut bb, 1).len(), 1);
    assert!(a.disconnect_connection("b"));
    assert!(!a.has_connection("b"));
    assert!(!a.disconnect_connection("b"));
}

fn send_after_disconnect_connection_reconnects(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.send_message("b", "hi").unwrap();
    assert_eq!(poll(&mut bb, 1).len(), 1);
    a.disconnect_connection("b");
    a.send_message("b", "again").unwrap();
    let msgs = poll(&mut bb, 1);
    assert_eq!(contents(&msgs), [json!("again")]);
    assert!(a.has_connection("b"));
}

fn close_idle_connections_closes_idle_entry(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.send_message("b", "hi").unwrap();
    assert_eq!(poll(&mut bb, 1).len(), 1);
    assert_eq!(a.close_idle_connections(10.0), 0);
    assert!(a.set_last_activity("b", now_stamp() - 1000.0));
    assert_eq!(a.close_idle_connections(10.0), 1);
    assert!(!a.has_connection("b"));
}

fn broken_cached_socket_fails_next_send_then_recovers(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.send_message("b", "hi").unwrap();
    assert_eq!(poll(&mut bb, 1).len(), 1);
    // Close a's cached socket behind the client's back.
    let handle = a.connection_handle("b").unwrap();
    rustix::net::shutdown(handle, rustix::net::Shutdown::Both).unwrap();
    // The next send fails (no automatic reconnect) and drops the entry...
    let err = a.send_message("b", "lost").unwrap_err();
    assert_eq!(err.to_string(), "write failed: Broken pipe");
    assert!(!a.has_connection("b"));
    // ...and the following one succeeds on a fresh connection.
    a.send_message("b", "after-reset").unwrap();
    let msgs = drain_for(&mut bb, std::time::Duration::from_millis(300));
    assert_eq!(contents(&msgs), [json!("after-reset")]);
}

fn stats_count_sent_and_read(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut sa = t.connect("sa");
    let mut sb = t.connect("sb");
    sa.send_message("sb", "x").unwrap();
    sa.send_message("sb", "y").unwrap();
    assert_eq!(poll(&mut sb, 2).len(), 2);
    assert_eq!(sa.stats().sent["sb"], 2);
    assert_eq!(sb.stats().read["sa"], 2);
}

fn peers_and_listening_peers(b: BackendChoice) {
    let t = TestRoute::new(b);
    let a = t.connect("a");
    let _b = t.connect("b");
    let _c = t.connect_nl("c");
    assert_eq!(a.peers().unwrap(), ["b", "c"]);
    assert_eq!(a.listening_peers().unwrap(), ["b"]);
    assert!(a.peer_is_listener("b").unwrap());
    assert!(!a.peer_is_listener("c").unwrap());
}

fn send_blocking_defaults(b: BackendChoice) {
    let t = TestRoute::new(b);
    let a = t.connect("a");
    assert!(a.send_blocking());
    assert_eq!(a.pending_sends(), 0);
}

fn non_blocking_small_send_is_written_at_once(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.set_send_blocking(false);
    assert!(!a.send_blocking());
    a.send_message("b", &json!({"hi": "there"})).unwrap();
    assert_eq!(a.pending_sends(), 0);
    let msgs = poll(&mut bb, 1);
    assert_eq!(contents(&msgs), [json!({"hi": "there"})]);
    assert_eq!(a.drain_pending(), 0);
}

fn non_blocking_warm_up_leaves_empty_buffer(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.set_send_blocking(false);
    a.try_send_message("b", "warm-up").unwrap();
    assert_eq!(poll(&mut bb, 1).len(), 1);
    assert!(a.has_connection("b"));
    assert!(!a.pending_sends_to("b"));
    assert!(a.can_send_to("b"));
}

fn queued_frame_shows_in_outbox_queries_then_drains(b: BackendChoice) {
    let t = TestRoute::new(b);
    let mut a = t.connect("a");
    let mut bb = t.connect("b");
    a.set_send_blocking(false);
    a.try_send_message("b", "warm-up").unwrap();
    assert_eq!(poll(&mut bb, 1).len(), 1);
    a.queue_message("b", &json!({"queued": 1})).unwrap();
    assert_eq!(a.pending_sends(), 1);
    assert!(a.pending_sends_to("b"));
    assert!(a.have_writable_handles());
    let handles: Vec<i32> = a.writable_handles().iter().map(|h| h.as_raw_fd()).collect();
    assert_eq!(handles, [a.connection_handle("b").unwrap().as_raw_fd()]);
    assert!(!a.can_send_to("b"));
    assert_eq!(a.drain_pending(), 1);
    assert_eq!(a.pending_sends(), 0);
    assert!(!a.pending_sends_to("b"));
    let msgs = poll(&mut bb, 1);
    assert_eq!(contents(&msgs), [json!({"queued": 1})]);
    assert!(drain_for(&mut bb, std::time::Duration::from_millis(100)).is_empty());
}

#[test]
fn client_is_usable_from_the_type_alone() {
    // `Client` must be Send so that it can move to a worker thread.
    fn assert_send<T: Send>() {}
    assert_send::<Client>();
}
