//! The examples are compiled into this test and run briefly, so CI proves
//! they work (`cargo run --example threaded|tokio|async_quickstart` runs
//! them in full).

#[path = "../examples/threaded.rs"]
mod threaded;

#[path = "../examples/tokio.rs"]
mod tokio_example;

#[path = "../examples/async_quickstart.rs"]
mod async_quickstart;

#[test]
fn the_readmes_async_quickstart_runs() {
    async_quickstart::main().unwrap();
}

#[test]
fn threaded_example_serves_requests() {
    assert_eq!(threaded::run(200).unwrap(), 200);
}

#[test]
fn tokio_example_runs_on_the_async_face() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(tokio_example::run(2000)).unwrap(), 2000);
}
