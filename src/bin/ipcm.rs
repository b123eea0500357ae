//! The `ipcm` command: speaks the IPC::Manager ConnectionUnix protocol from
//! the shell, for scripts and for other languages' tests, and measures it.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipcm::{BackendChoice, Client, Info, Message, Options, Route, Serializer};

/// Fast message passing between local processes, compatible with Perl
/// IPC::Manager's ConnectionUnix client.
///
/// Clients of a bus share a route directory; each listening client owns a
/// UNIX socket there. INFO is an info string as `ipcm spawn` (or the Perl
/// spawner) prints it, e.g.
/// ["IPC::Manager::Client::ConnectionUnix","IPC::Manager::Serializer::JSON","/tmp/PerlIPCManager-1-AbCdEf"],
/// or a bare route directory path (then the JSON serializer is assumed).
#[derive(Parser, Debug)]
#[command(name = "ipcm", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a route directory (mode 0700) and print its info string.
    ///
    /// The directory is created under $TMPDIR (when it is a writable
    /// directory) or /tmp, named PerlIPCManager-<pid>-XXXXXX, and stays until
    /// `ipcm unspawn`.
    Spawn {
        /// Serializer of the route (binary routes are Rust-only).
        #[arg(long, value_enum, default_value_t = SerializerArg::Json)]
        serializer: SerializerArg,
        /// Parent directory instead of $TMPDIR or /tmp.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Remove a route directory and everything in it.
    ///
    /// Refuses while live clients remain, unless --force is given.
    Unspawn {
        /// Info string or route directory.
        info: String,
        /// Remove the route even with live clients on it.
        #[arg(long)]
        force: bool,
    },
    /// Listen as client ID and print each received message as one JSON line.
    ///
    /// Prints "ready" on stderr once the socket exists, then every message
    /// as a compact JSON object (from, to, content, id, stamp, stamp_ord, and
    /// broadcast when set) on stdout, flushed after each. Stops after
    /// --count messages or when --timeout passes, then disconnects cleanly
    /// (socket removed, .stats written). Exits 0, or 1 when --count was
    /// given and the timeout passed first.
    Recv {
        /// Info string or route directory.
        info: String,
        /// Client id to listen as.
        #[arg(long)]
        id: String,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Receive in threaded mode: the reactor runs on its own thread and
        /// messages come through the receive ring.
        #[arg(long)]
        threaded: bool,
        #[command(flatten)]
        backend: BackendArg,
    },
    /// Send each CONTENT (a JSON text) as a message from client ID.
    ///
    /// Connects as a non-listening client, sends the contents in order to
    /// --to PEER (or to every live peer with --broadcast), disconnects
    /// cleanly and exits 0. A CONTENT of "-" reads JSON texts from stdin, one
    /// per line. Errors (unknown or non-listening peer, bad JSON) are printed
    /// on stderr and the exit status is non-zero.
    Send {
        /// Info string or route directory.
        info: String,
        /// Client id to send as.
        #[arg(long)]
        id: String,
        /// Recipient.
        #[arg(
            long,
            conflicts_with = "broadcast",
            required_unless_present = "broadcast"
        )]
        to: Option<String>,
        /// Send to every live peer.
        #[arg(long)]
        broadcast: bool,
        /// JSON texts to send ("-" reads lines from stdin).
        #[arg(required = true)]
        content: Vec<String>,
        #[command(flatten)]
        backend: BackendArg,
    },
    /// Print the live peers of a route, one per line, sorted.
    Peers {
        /// Info string or route directory.
        info: String,
        /// Leave this id out.
        #[arg(long)]
        id: Option<String>,
    },
    /// Print a client's .stats (written when it disconnects) as JSON.
    Stats {
        /// Info string or route directory.
        info: String,
        /// The client.
        #[arg(long)]
        id: String,
    },
    /// Measure: a private route, senders and a listener; prints throughput
    /// and latency percentiles with the backend used.
    ///
    /// With --backend both, the two backends alternate round by round (see
    /// --rounds) and their medians and ratio are printed.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct BackendArg {
    /// I/O backend (default: $IPCM_BACKEND, else io_uring when available).
    #[arg(long, value_enum, default_value_t = BackendArgValue::Auto)]
    backend: BackendArgValue,
}

#[derive(Args, Debug, Clone)]
struct BenchArgs {
    /// Content bytes per message.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages in total per round.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Backend of the listener ("both" compares epoll and io_uring).
    #[arg(long, value_enum, default_value_t = BenchBackend::Auto)]
    backend: BenchBackend,
    /// Backend of the senders (default: the listener's).
    #[arg(long, value_enum)]
    sender_backend: Option<BackendArgValue>,
    /// Concurrent senders (threads, one client each).
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Queue this many messages per flush (0: each send is written at once).
    #[arg(long, default_value_t = 64)]
    batch: u64,
    /// Use blocking sends (implies --batch 0).
    #[arg(long)]
    blocking: bool,
    /// Serializer of the route.
    #[arg(long, value_enum, default_value_t = SerializerArg::Json)]
    serializer: SerializerArg,
    /// Rounds per backend (medians are reported).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Print one JSON object per round and a summary object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SerializerArg {
    Json,
    JsonZstd,
    Binary,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BackendArgValue {
    Auto,
    #[value(name = "io_uring", alias = "io-uring")]
    IoUring,
    Epoll,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BenchBackend {
    Auto,
    #[value(name = "io_uring", alias = "io-uring")]
    IoUring,
    Epoll,
    Both,
}

impl From<BackendArgValue> for BackendChoice {
    fn from(b: BackendArgValue) -> Self {
        match b {
            BackendArgValue::Auto => BackendChoice::Auto,
            BackendArgValue::IoUring => BackendChoice::IoUring,
            BackendArgValue::Epoll => BackendChoice::Epoll,
        }
    }
}

impl SerializerArg {
    fn make(self) -> ipcm::Result<Serializer> {
        Ok(match self {
            SerializerArg::Json => Serializer::Json,
            SerializerArg::JsonZstd => Serializer::json_zstd()?,
            SerializerArg::Binary => Serializer::Binary,
        })
    }
}

/// A failure: its message goes to stderr as one line.
struct Fail(String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(e.to_string())
    }
}

type Out = Result<ExitCode, Fail>;

/// The library's log records on stderr, one line each ("ipcm: warning:
/// ..."); the level is `$IPCM_LOG` (off, error, warn, info, debug, trace),
/// warn by default.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let level = match r.level() {
                log::Level::Error => "error",
                log::Level::Warn => "warning",
                log::Level::Info => "info",
                log::Level::Debug => "debug",
                log::Level::Trace => "trace",
            };
            eprintln!("ipcm: {level}: {}", r.args());
        }
    }

    fn flush(&self) {}
}

fn init_logging() {
    static LOG: StderrLog = StderrLog;
    let level = std::env::var("IPCM_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(log::LevelFilter::Warn);
    if log::set_logger(&LOG).is_ok() {
        log::set_max_level(level);
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Spawn { serializer, dir } => spawn(serializer, dir),
        Command::Unspawn { info, force } => unspawn(&info, force),
        Command::Recv {
            info,
            id,
            count,
            timeout,
            threaded,
            backend,
        } => recv(&info, &id, count, timeout, threaded, backend.backend.into()),
        Command::Send {
            info,
            id,
            to,
            broadcast: _,
            content,
            backend,
        } => send(&info, &id, to.as_deref(), &content, backend.backend.into()),
        Command::Peers { info, id } => peers(&info, id.as_deref()),
        Command::Stats { info, id } => stats(&info, &id),
        Command::Bench(args) => bench(&args),
    };
    match res {
        Ok(code) => code,
        Err(Fail(msg)) => {
            eprintln!("ipcm: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// INFO: an info string, or a bare route directory (JSON serializer).
fn parse_info(arg: &str) -> Result<Info, Fail> {
    let t = arg.trim();
    if t.starts_with('[') {
        return Ok(Info::parse(t)?);
    }
    if t.is_empty() {
        return Err(Fail(
            "INFO is empty: give an info string or a route directory".into(),
        ));
    }
    Ok(Info::new(Serializer::Json, t))
}

fn spawn(serializer: SerializerArg, dir: Option<PathBuf>) -> Out {
    let ser = serializer.make()?;
    let route = Route::spawn(dir.as_deref())?;
    println!("{}", Info::new(ser, route.path()));
    Ok(ExitCode::SUCCESS)
}

fn unspawn(info: &str, force: bool) -> Out {
    let info = parse_info(info)?;
    let route = Route::new(info.route);
    if !route.exists() {
        return Err(Fail(format!("route '{}' does not exist", route.path())));
    }
    let live = route.peers(None)?;
    if !live.is_empty() && !force {
        return Err(Fail(format!(
            "route '{}' still has live clients ({}); stop them first or use --force",
            route.path(),
            live.join(", ")
        )));
    }
    route.unspawn()?;
    Ok(ExitCode::SUCCESS)
}

fn print_message(out: &mut impl Write, m: &Message) -> Result<(), Fail> {
    serde_json::to_writer(&mut *out, &m.to_value())?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

fn recv(
    info: &str,
    id: &str,
    count: Option<u64>,
    timeout: f64,
    threaded: bool,
    backend: BackendChoice,
) -> Out {
    let info = parse_info(info)?;
    if !timeout.is_finite() || timeout < 0.0 {
        return Err(Fail(format!(
            "--timeout must be a non-negative number of seconds, not {timeout}"
        )));
    }
    let mut c = Client::connect(&info, id, Options::new().backend(backend))?;
    eprintln!("ready");
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut n = 0u64;
    let want = count.unwrap_or(u64::MAX);
    if threaded {
        return recv_threaded(c, &mut out, deadline, count);
    }
    while n < want {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        for m in c.get_messages_timeout(deadline - now)? {
            if n == want {
                // Already handed to us: requeue rather than lose it.
                c.requeue_message(std::slice::from_ref(&m))?;
                continue;
            }
            print_message(&mut out, &m)?;
            n += 1;
        }
    }
    let mut late = 0usize;
    let mut keep = |_: &Client, msgs: Vec<Message>| late += msgs.len();
    c.disconnect(Some(&mut keep))?;
    Ok(recv_outcome(late, count, n))
}

/// `recv --threaded`: the same output and exit status, with the reactor on
/// its own thread and messages taken from the receive ring.
fn recv_threaded(c: Client, out: &mut impl Write, deadline: Instant, count: Option<u64>) -> Out {
    let want = count.unwrap_or(u64::MAX);
    let (mut tx, mut rx, handle) = c.into_threaded()?;
    let mut n = 0u64;
    while n < want {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Some(m) => {
                print_message(out, &m)?;
                n += 1;
            }
            None if !handle.is_running() => break,
            None => {}
        }
    }
    // Messages already in the ring beyond --count go back to the resume
    // file rather than being lost.
    let extra: Vec<Message> = std::iter::from_fn(|| rx.try_recv()).collect();
    if !extra.is_empty() {
        tx.requeue(extra)?;
    }
    handle.shutdown()?;
    let late = std::iter::from_fn(|| rx.try_recv()).count();
    Ok(recv_outcome(late, count, n))
}

/// How `recv` ends: a note for messages that came during the disconnect,
/// and exit status 1 when `--count` was not reached.
fn recv_outcome(late: usize, count: Option<u64>, n: u64) -> ExitCode {
    if late > 0 {
        eprintln!("ipcm: {late} message(s) arrived during disconnect and were not printed");
    }
    if count.is_some_and(|want| n < want) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn parse_content(text: &str) -> Result<serde_json::Value, Fail> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Fail(format!("content {text:?} is not valid JSON: {e}")))?;
    if v.is_null() {
        return Err(Fail("'content' is a required attribute".into()));
    }
    Ok(v)
}

fn send(
    info: &str,
    id: &str,
    to: Option<&str>,
    contents: &[String],
    backend: BackendChoice,
) -> Out {
    let info = parse_info(info)?;
    // Validate the command-line texts before sending any of them.
    for c in contents.iter().filter(|c| c.as_str() != "-") {
        parse_content(c)?;
    }
    let mut client = Client::connect(&info, id, Options::new().backend(backend).listen(false))?;
    let result = send_all(&mut client, to, contents);
    let closed = client.disconnect(None);
    result?;
    closed?;
    Ok(ExitCode::SUCCESS)
}

fn send_all(client: &mut Client, to: Option<&str>, contents: &[String]) -> Result<(), Fail> {
    let mut one = |text: &str| -> Result<(), Fail> {
        let v = parse_content(text)?;
        match to {
            Some(peer) => client.send_message(peer, &v)?,
            None => {
                let res = client.broadcast(&v)?;
                let failed: Vec<String> = res
                    .iter()
                    .filter(|(_, r)| !r.sent)
                    .map(|(p, r)| format!("{p}: {}", r.error.as_deref().unwrap_or("not sent")))
                    .collect();
                if !failed.is_empty() {
                    return Err(Fail(format!("broadcast failed for {}", failed.join("; "))));
                }
            }
        }
        Ok(())
    };
    for c in contents {
        if c == "-" {
            for line in std::io::stdin().lock().lines() {
                let line = line?;
                if !line.trim().is_empty() {
                    one(&line)?;
                }
            }
        } else {
            one(c)?;
        }
    }
    Ok(())
}

fn peers(info: &str, id: Option<&str>) -> Out {
    let info = parse_info(info)?;
    let route = Route::new(info.route);
    let own = id.map(|i| route.on_disk_name(i)).transpose()?;
    for p in route.peers(own.as_deref())? {
        println!("{p}");
    }
    Ok(ExitCode::SUCCESS)
}

fn stats(info: &str, id: &str) -> Out {
    let info = parse_info(info)?;
    let route = Route::new(info.route.clone());
    let disk = route.on_disk_name(id)?;
    let stats = route.read_stats(&disk, &info.serializer)?;
    println!("{}", serde_json::to_string(&stats)?);
    Ok(ExitCode::SUCCESS)
}

// ----- bench ------------------------------------------------------------

struct Round {
    backend: String,
    messages: u64,
    secs: f64,
    latency_us: Vec<f64>,
}

impl Round {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.secs
    }

    fn pct(&self, p: f64) -> f64 {
        if self.latency_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latency_us.len() as f64 - 1.0) * p).round() as usize;
        self.latency_us[i]
    }
}

fn bench(args: &BenchArgs) -> Out {
    if args.senders == 0 || args.messages == 0 {
        return Err(Fail("--senders and --messages must be at least 1".into()));
    }
    let backends: Vec<BackendChoice> = match args.backend {
        BenchBackend::Auto => vec![BackendChoice::Auto],
        BenchBackend::IoUring => vec![BackendChoice::IoUring],
        BenchBackend::Epoll => vec![BackendChoice::Epoll],
        BenchBackend::Both => vec![BackendChoice::Epoll, BackendChoice::IoUring],
    };
    let mut per_backend: Vec<Vec<Round>> = backends.iter().map(|_| Vec::new()).collect();
    for _ in 0..args.rounds.max(1) {
        for (i, b) in backends.iter().enumerate() {
            let r = bench_round(args, *b)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "backend": r.backend, "messages": r.messages, "size": args.size,
                        "senders": args.senders, "seconds": r.secs, "msgs_per_sec": r.rate(),
                        "mb_per_sec": r.rate() * args.size as f64 / 1e6,
                        "latency_us": {"p50": r.pct(0.5), "p90": r.pct(0.9), "p99": r.pct(0.99),
                                       "p999": r.pct(0.999), "max": r.pct(1.0)},
                    })
                );
            } else {
                println!(
                    "{:>8}: {} msgs x {} B from {} sender(s) in {:.3}s: {:.0} msgs/s, {:.1} MB/s; \
                     latency us p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
                    r.backend,
                    r.messages,
                    args.size,
                    args.senders,
                    r.secs,
                    r.rate(),
                    r.rate() * args.size as f64 / 1e6,
                    r.pct(0.5),
                    r.pct(0.9),
                    r.pct(0.99),
                    r.pct(0.999),
                    r.pct(1.0)
                );
            }
            per_backend[i].push(r);
        }
    }
    let medians: Vec<(String, f64)> = per_backend
        .iter()
        .map(|rs| {
            let mut rates: Vec<f64> = rs.iter().map(Round::rate).collect();
            rates.sort_by(f64::total_cmp);
            (rs[0].backend.clone(), rates[rates.len() / 2])
        })
        .collect();
    if args.json {
        let ratio = (medians.len() == 2).then(|| medians[1].1 / medians[0].1);
        println!(
            "{}",
            serde_json::json!({"summary": medians.iter().map(|(b, r)| (b.clone(), serde_json::json!(r))).collect::<serde_json::Map<_, _>>(), "ratio": ratio})
        );
    } else {
        if args.rounds > 1 {
            for (b, r) in &medians {
                println!("{b:>8}: median {r:.0} msgs/s over {} rounds", args.rounds);
            }
        }
        if let [(a, ra), (b, rb)] = medians.as_slice() {
            println!("ratio {b}/{a}: {:.2}", rb / ra);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_round(args: &BenchArgs, backend: BackendChoice) -> Result<Round, Fail> {
    let route = Route::spawn(None)?;
    let guard = RouteGuard(route.clone());
    let info = Info::new(args.serializer.make()?, route.path());
    let mut rx = Client::connect(&info, "sink", Options::new().backend(backend))?;
    let kind = rx.backend().to_string();
    let per_sender = args.messages.div_ceil(args.senders as u64);
    let total = per_sender * args.senders as u64;
    let epoch = Instant::now();
    let pad = "x".repeat(args.size.saturating_sub(24));
    let bar = indicatif::ProgressBar::new(total);
    if !std::io::stdout().is_terminal() || args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let sender_backend = args.sender_backend.map_or(backend, BackendChoice::from);
    let batch = if args.blocking { 0 } else { args.batch };
    let start = Instant::now();
    let mut threads = Vec::new();
    for s in 0..args.senders {
        let info = info.clone();
        let pad = pad.clone();
        let blocking = args.blocking;
        threads.push(std::thread::spawn(move || -> ipcm::Result<()> {
            let opts = Options::new().listen(false).backend(sender_backend);
            let mut tx = Client::connect(&info, &format!("source-{s}"), opts)?;
            tx.set_send_blocking(blocking);
            for n in 0..per_sender {
                if batch > 0 && n % batch == 0 {
                    tx.drain_pending();
                }
                let content = serde_json::json!({"t": epoch.elapsed().as_nanos() as u64, "p": pad});
                loop {
                    let sent = if batch > 0 {
                        tx.queue_message("sink", &content)
                    } else {
                        tx.send_message("sink", &content)
                    };
                    match sent {
                        Ok(()) => break,
                        Err(ipcm::Error::WouldBlock { .. }) => {
                            tx.drain_pending();
                            std::thread::sleep(Duration::from_micros(20));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            tx.disconnect(None)
        }));
    }
    #[derive(serde::Deserialize)]
    struct Stamp {
        t: u64,
    }
    let mut latency_us = Vec::with_capacity(total as usize);
    while (latency_us.len() as u64) < total {
        let batch = rx.get_messages_timeout(Duration::from_secs(10))?;
        if batch.is_empty() {
            return Err(Fail(format!(
                "only {} of {total} messages arrived (no progress for 10 s)",
                latency_us.len()
            )));
        }
        let now = epoch.elapsed().as_nanos() as u64;
        for m in &batch {
            let s: Stamp = m.content()?;
            latency_us.push(now.saturating_sub(s.t) as f64 / 1000.0);
        }
        bar.inc(batch.len() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    for t in threads {
        t.join()
            .map_err(|_| Fail("a sender thread panicked".into()))??;
    }
    rx.disconnect(None)?;
    drop(guard);
    latency_us.sort_by(f64::total_cmp);
    Ok(Round {
        backend: kind,
        messages: total,
        secs,
        latency_us,
    })
}

/// Removes a bench route however the round ends.
struct RouteGuard(Route);

impl Drop for RouteGuard {
    fn drop(&mut self) {
        let _ = self.0.unspawn();
    }
}
