//! Every name of the Perl client's public API (the API table of the
//! protocol description ipcm implements) exists in ipcm, or is listed in
//! docs/perl-differences.md as deliberately absent, with the reason.
//! Each present name is referenced below, so a missing one fails to
//! compile; the absent ones are checked against the document.

use ipcm::{Client, Route};

/// `(Perl name, ipcm item)`; `None`: deliberately absent.
fn api() -> Vec<(&'static str, Option<&'static str>)> {
    macro_rules! present {
        ($perl:literal => $item:path) => {{
            let _ = $item;
            ($perl, Some(stringify!($item)))
        }};
    }
    vec![
        present!("all_stats" => Client::all_stats),
        present!("broadcast" => Client::broadcast::<()>),
        present!("build_message" => Client::build_message::<()>),
        ("can_select", None),
        present!("can_send_to" => Client::can_send_to),
        present!("check_path" => Client::check_path),
        present!("clear_pid" => Client::clear_pid),
        present!("close_idle_connections" => Client::close_idle_connections),
        present!("connect" => Client::connect),
        present!("connections" => Client::connections),
        present!("disconnect" => Client::disconnect),
        present!("disconnect_connection" => Client::disconnect_connection),
        present!("disconnected" => Client::disconnected),
        present!("drain_pending" => Client::drain_pending),
        present!("get_messages" => Client::get_messages),
        present!("handles_for_peer_change" => Client::handles_for_peer_change),
        present!("handles_for_select" => Client::handles_for_select),
        present!("has_connection" => Client::has_connection),
        present!("have_dynamic_handles_for_select" => Client::have_dynamic_handles_for_select),
        present!("have_handles_for_peer_change" => Client::have_handles_for_peer_change),
        present!("have_handles_for_select" => Client::have_handles_for_select),
        present!("have_pending_messages" => Client::have_pending_messages),
        present!("have_pending_sends" => Client::have_pending_sends),
        present!("have_ready_messages" => Client::have_ready_messages),
        present!("have_resume_file" => Client::have_resume_file),
        present!("have_writable_handles" => Client::have_writable_handles),
        present!("id" => Client::id),
        present!("last_activity" => Client::last_activity),
        present!("listen" => Client::listen),
        present!("listening_peers" => Client::listening_peers),
        present!("local_clients" => Client::local_clients),
        present!("max_on_disk_name_length" => Client::max_on_disk_name_length),
        present!("name_file" => Client::name_file),
        present!("new" => Client::connect),
        present!("on_disk_name" => Client::on_disk_name),
        present!("path" => Client::path),
        present!("path_type" => Client::path_type),
        present!("peer_active" => Client::peer_active),
        present!("peer_exists" => Client::peer_exists),
        present!("peer_is_listener" => Client::peer_is_listener),
        present!("peer_left" => Client::peer_left),
        present!("peer_pid" => Client::peer_pid),
        present!("peer_pid_file" => Client::peer_pid_file),
        present!("peer_suspend_expires" => Client::peer_suspend_expires),
        present!("peer_suspend_file" => Client::peer_suspend_file),
        present!("peers" => Client::peers),
        present!("pending_messages" => Client::pending_messages),
        present!("pending_sends" => Client::pending_sends),
        present!("pending_sends_to" => Client::pending_sends_to),
        present!("pid" => Client::pid),
        present!("pid_check" => Client::pid_check),
        present!("pid_is_running" => Client::pid_is_running),
        present!("pidfile" => Client::pidfile),
        present!("read_resume_file" => Client::read_resume_file),
        present!("read_stats" => Client::read_stats),
        present!("ready_messages" => Client::ready_messages),
        present!("reconnect" => Client::reconnect),
        present!("requeue_message" => Client::requeue_message),
        present!("reset_handles_for_peer_change" => Client::reset_handles_for_peer_change),
        present!("resume_file" => Client::resume_file),
        present!("route" => Client::route),
        ("select", None),
        present!("send_blocking" => Client::send_blocking),
        present!("send_message" => Client::send_message::<()>),
        present!("serializer" => Client::serializer),
        present!("set_listen" => Client::set_listen),
        present!("set_send_blocking" => Client::set_send_blocking),
        present!("sort_messages" => ipcm::sort_messages),
        present!("spawn" => Route::spawn),
        present!("stats" => Client::stats),
        present!("stats_file" => Client::stats_file),
        present!("suspend" => Client::suspend),
        present!("suspend_supported" => Client::suspend_supported),
        present!("try_message" => Client::try_message::<()>),
        present!("try_send_message" => Client::try_send_message::<()>),
        present!("unspawn" => Route::unspawn),
        present!("viable" => Client::viable),
        present!("writable_handles" => Client::writable_handles),
        present!("write_pid" => Client::write_pid),
        present!("write_stats" => Client::write_stats),
    ]
}

#[test]
fn every_perl_api_name_exists_or_is_documented_as_absent() {
    let api = api();
    assert_eq!(api.len(), 80, "the Perl API table has 80 names");
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/perl-differences.md"
    ))
    .unwrap();
    let section = doc
        .split("## Perl API names ipcm leaves out")
        .nth(1)
        .expect("docs/perl-differences.md lists the names it leaves out");
    // The names a bullet of the section starts with (before its colon).
    let absent: Vec<&str> = section
        .lines()
        .take_while(|l| !l.starts_with("## "))
        .filter_map(|l| l.strip_prefix("* "))
        .filter_map(|l| l.split(':').next())
        .flat_map(|head| head.split('`').skip(1).step_by(2))
        .collect();
    assert!(!absent.is_empty());
    for (perl, item) in &api {
        let listed = absent.contains(perl);
        match item {
            Some(_) => assert!(!listed, "`{perl}` exists but is listed as absent"),
            None => assert!(listed, "`{perl}` is absent but not documented as such"),
        }
    }
}

#[macro_use]
mod common;

use common::TestRoute;
use ipcm::{BackendChoice, EntryKind, PidState};

per_backend!(the_names_added_for_the_perl_api_behave_as_perl_describes);

fn the_names_added_for_the_perl_api_behave_as_perl_describes(b: BackendChoice) {
    assert!(Client::viable());
    let t = TestRoute::new(b);
    let route = t.route.path().to_string();
    assert!(Client::local_clients(&route).is_empty());
    let mut a = t.connect("a");
    let mut c = t.connect_nl("c");
    assert_eq!(Client::local_clients(&route), ["a", "c"]);
    // File locations of peers.
    assert_eq!(
        a.peer_pid_file("c").unwrap(),
        t.file("c.pid").to_str().unwrap()
    );
    assert_eq!(
        a.peer_suspend_file("c").unwrap(),
        t.file("c.suspend").to_str().unwrap()
    );
    assert_eq!(Client::check_path(a.path()), Some(EntryKind::Socket));
    assert_eq!(Client::check_path(c.path()), Some(EntryKind::Marker));
    assert_eq!(
        Client::pid_is_running(std::process::id()),
        PidState::Running
    );
    // clear_pid: peers see pid 0 (not active); write_pid restores it.
    c.clear_pid().unwrap();
    assert_eq!(a.peer_pid("c").unwrap(), Some(0));
    assert!(!a.peer_active("c", None).unwrap());
    c.write_pid().unwrap();
    assert_eq!(a.peer_pid("c").unwrap(), Some(std::process::id()));
    // set_listen has no effect after construction.
    c.set_listen(true);
    assert!(!c.listen());
    assert!(a.have_dynamic_handles_for_select());
    // The resume file: probed, then consumed.
    assert!(!a.have_resume_file());
    let m = a.build_message("a", &serde_json::json!({"n": 1})).unwrap();
    a.requeue_message(&[m]).unwrap();
    assert!(a.have_resume_file());
    let back = a.read_resume_file().unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].content_json(), r#"{"n":1}"#);
    assert!(!a.have_resume_file(), "consumed");
    // read_stats: what write_stats wrote.
    a.send_message("c", &1).unwrap_err();
    a.write_stats().unwrap();
    assert_eq!(&a.read_stats().unwrap(), a.stats());
    c.disconnect(None).unwrap();
    assert_eq!(Client::local_clients(&route), ["a"], "gone at disconnect");
    a.disconnect(None).unwrap();
    assert!(Client::local_clients(&route).is_empty());
}
