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
    /// Print the live peers of a route, one per line, sorted. With
    /// --watch, print one JSON line per peer joining or leaving instead
    /// ({"event":"joined","id":...}; the peers present come first, as
    /// joined) until interrupted or the route is removed.
    Peers {
        /// Info string or route directory.
        info: String,
        /// Leave this id out.
        #[arg(long)]
        id: Option<String>,
        /// Keep watching: a JSON line per join or leave.
        #[arg(long)]
        watch: bool,
    },
    /// Print a client's .stats (written when it disconnects) as JSON.
    Stats {
        /// Info string or route directory.
        info: String,
        /// The client.
        #[arg(long)]
        id: String,
    },
    /// Measure on a private route: throughput (senders into a listener)
    /// and the unloaded round trip (a ping-pong, with blocking waits and
    /// with busy polling), labelled with the backend and serializer.
    ///
    /// With --backend both, the two backends alternate round by round (see
    /// --rounds) and their medians and ratios are printed.
    /// --queueing-latency adds the time messages wait in queues while the
    /// senders saturate the listener (that is not a round trip).
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
    /// Messages in total per round, for throughput (default: 512 MiB of
    /// content, at most 10 million messages).
    #[arg(long)]
    messages: Option<u64>,
    /// Round trips per ping-pong (each mode; the first tenth warms up).
    #[arg(long, default_value_t = 20_000)]
    round_trips: u64,
    /// Also measure queueing latency under load: each message carries its
    /// send time, and the listener reports how long it waited (senders
    /// saturating the listener: this is queueing, not a round trip).
    #[arg(long)]
    queueing_latency: bool,
    /// Backend of the listener ("both" compares epoll and io_uring).
    #[arg(long, value_enum, default_value_t = BenchBackend::Auto)]
    backend: BenchBackend,
    /// Backend of the senders (default: the listener's).
    #[arg(long, value_enum)]
    sender_backend: Option<BackendArgValue>,
    /// Concurrent senders (threads, one client each).
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Queue this many messages per flush (default: what fills 64 KiB;
    /// 1: each send is written at once).
    #[arg(long)]
    batch: Option<u64>,
    /// Use blocking sends (implies --batch 0).
    #[arg(long)]
    blocking: bool,
    /// Serializer of the route (binary: ipcm's own batch wire; json: the
    /// Perl-compatible one).
    #[arg(long, value_enum, default_value_t = SerializerArg::Binary)]
    serializer: SerializerArg,
    /// Rounds per backend (medians are reported).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Print one JSON object per round and a summary object instead of text.
    #[arg(long)]
    json: bool,
    /// The shared-memory lane between the bench's clients (on: busy
    /// connections move to it; off: every message crosses the socket,
    /// which is what compares the backends).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    lane: OnOff,
    /// How long, in microseconds, a blocking wait looks for work before it
    /// sleeps (the clients' `Options::spin_before_sleep`; 0: sleep at once).
    #[arg(long, default_value_t = Options::default().spin_before_sleep.as_micros() as u64)]
    spin_before_sleep_us: u64,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

impl BenchArgs {
    /// The options every client of the bench starts from.
    fn opts(&self, backend: BackendChoice) -> Options {
        Options::new()
            .backend(backend)
            .lane(self.lane == OnOff::On)
            .spin_before_sleep(Duration::from_micros(self.spin_before_sleep_us))
    }

    fn messages(&self) -> u64 {
        self.messages
            .unwrap_or(((512u64 << 20) / self.size.max(1) as u64).clamp(20_000, 10_000_000))
    }

    /// Messages queued per flush; 0 for blocking sends.
    fn flush_every(&self) -> u64 {
        if self.blocking {
            return 0;
        }
        self.batch
            .unwrap_or((64 * 1024 / (self.size as u64 + 4)).max(1))
            .max(1)
    }
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
        Command::Peers { info, id, watch } => peers(&info, id.as_deref(), watch),
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

fn peers(info: &str, id: Option<&str>, watch: bool) -> Out {
    use std::io::Write;
    let info = parse_info(info)?;
    let route = Route::new(info.route);
    let own = id.map(|i| route.on_disk_name(i)).transpose()?;
    if !watch {
        for p in route.peers(own.as_deref())? {
            println!("{p}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The peers present count as joined (every line is a change from an
    // empty route), then the changes as they come.
    let mut w = ipcm::PeerWatch::new(&route, own.as_deref())?;
    let mut out = std::io::stdout().lock();
    let present: Vec<ipcm::PeerEvent> =
        w.peers().into_iter().map(ipcm::PeerEvent::Joined).collect();
    let mut events = present
        .into_iter()
        .map(Ok)
        .chain(std::iter::from_fn(|| w.next_event(None).transpose()));
    while let Some(e) = events.next().transpose()? {
        let line = match e {
            ipcm::PeerEvent::Joined(id) => serde_json::json!({"event": "joined", "id": id}),
            ipcm::PeerEvent::Left(id) => serde_json::json!({"event": "left", "id": id}),
        };
        writeln!(out, "{line}")?;
        out.flush()?;
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

/// Sorted samples, in microseconds.
struct Samples(Vec<f64>);

impl Samples {
    fn new(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Samples(v)
    }

    fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i]
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"p50": self.pct(0.5), "p90": self.pct(0.9), "p99": self.pct(0.99),
                           "p999": self.pct(0.999), "max": self.pct(1.0), "samples": self.0.len()})
    }

    fn text(&self) -> String {
        format!(
            "p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
            self.pct(0.5),
            self.pct(0.99),
            self.pct(0.999)
        )
    }
}

struct Round {
    backend: String,
    /// The path each measurement's messages took: throughput, blocking
    /// and busy ping-pong.
    paths: [&'static str; 3],
    messages: u64,
    secs: f64,
    /// Ping-pong round trips: blocking waits, busy polling.
    blocking: Samples,
    busy: Samples,
    /// Time in queues under load (--queueing-latency).
    queueing: Option<Samples>,
}

impl Round {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.secs
    }
}

fn bench(args: &BenchArgs) -> Out {
    if args.senders == 0 || args.messages() == 0 || args.round_trips == 0 {
        return Err(Fail(
            "--senders, --messages and --round-trips must be at least 1".into(),
        ));
    }
    let backends: Vec<BackendChoice> = match args.backend {
        BenchBackend::Auto => vec![BackendChoice::Auto],
        BenchBackend::IoUring => vec![BackendChoice::IoUring],
        BenchBackend::Epoll => vec![BackendChoice::Epoll],
        BenchBackend::Both => vec![BackendChoice::Epoll, BackendChoice::IoUring],
    };
    let ser = args.serializer.make()?;
    let ser_name = ser.class().rsplit("::").next().unwrap_or("?").to_string();
    if !args.json {
        println!(
            "ipcm bench: {} serializer, {} B content, {} sender(s), {} messages per round, \
             {} round trips per ping-pong, shared-memory lane {}",
            ser_name,
            args.size,
            args.senders,
            args.messages(),
            args.round_trips,
            if args.lane == OnOff::On { "on" } else { "off" }
        );
    }
    let mut per_backend: Vec<Vec<Round>> = backends.iter().map(|_| Vec::new()).collect();
    for _ in 0..args.rounds.max(1) {
        for (i, b) in backends.iter().enumerate() {
            let r = bench_round(args, *b)?;
            if args.json {
                let mut v = serde_json::json!({
                    "backend": r.backend, "serializer": ser_name, "messages": r.messages,
                    "size": args.size, "senders": args.senders,
                    "throughput": {"seconds": r.secs, "msgs_per_sec": r.rate(),
                                   "mb_per_sec": r.rate() * args.size as f64 / 1e6},
                    "round_trip_us": {"blocking": r.blocking.json(), "busy_poll": r.busy.json()},
                    "path": {"throughput": r.paths[0], "blocking": r.paths[1], "busy_poll": r.paths[2]},
                });
                if let Some(q) = &r.queueing {
                    v["queueing_latency_under_load_us"] = q.json();
                }
                println!("{v}");
            } else {
                println!(
                    "{:>8}: throughput {:.2} M msgs/s, {:.1} MB/s ({} messages in {:.3} s, {})",
                    r.backend,
                    r.rate() / 1e6,
                    r.rate() * args.size as f64 / 1e6,
                    r.messages,
                    r.secs,
                    r.paths[0]
                );
                println!(
                    "{:>8}: round trip, unloaded ping-pong, blocking waits (spin {} us, then sleep): {} ({})",
                    r.backend,
                    args.spin_before_sleep_us,
                    r.blocking.text(),
                    r.paths[1]
                );
                println!(
                    "{:>8}: round trip, unloaded ping-pong, busy polling:  {} ({})",
                    r.backend,
                    r.busy.text(),
                    r.paths[2]
                );
                if let Some(q) = &r.queueing {
                    println!(
                        "{:>8}: queueing latency under load (time in queues, not a round trip): {}",
                        r.backend,
                        q.text()
                    );
                }
            }
            per_backend[i].push(r);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let medians: Vec<(String, f64, f64)> = per_backend
        .iter()
        .map(|rs| {
            let mut rates: Vec<f64> = rs.iter().map(Round::rate).collect();
            let mut p50: Vec<f64> = rs.iter().map(|r| r.blocking.pct(0.5)).collect();
            (rs[0].backend.clone(), median(&mut rates), median(&mut p50))
        })
        .collect();
    if args.json {
        let ratio = (medians.len() == 2).then(|| medians[1].1 / medians[0].1);
        println!(
            "{}",
            serde_json::json!({"summary": medians.iter().map(|(b, r, _)| (b.clone(), serde_json::json!(r))).collect::<serde_json::Map<_, _>>(), "ratio": ratio})
        );
    } else {
        if args.rounds > 1 {
            for (b, r, p) in &medians {
                println!(
                    "{b:>8}: median over {} rounds: throughput {:.2} M msgs/s, blocking round trip p50 {p:.1} us",
                    args.rounds,
                    r / 1e6
                );
            }
        }
        if let [(a, ra, pa), (b, rb, pb)] = medians.as_slice() {
            println!(
                "ratio {b}/{a}: throughput {:.2}, blocking round trip p50 {:.2}",
                rb / ra,
                pb / pa
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_round(args: &BenchArgs, backend: BackendChoice) -> Result<Round, Fail> {
    let route = Route::spawn(None)?;
    let guard = RouteGuard(route.clone());
    let info = Info::new(args.serializer.make()?, route.path());
    let (secs, total, kind, path) = throughput(args, &info, backend)?;
    let (blocking, blocking_path) = ping_pong(args, &info, backend, false)?;
    let (busy, busy_path) = ping_pong(args, &info, backend, true)?;
    let queueing = if args.queueing_latency {
        Some(queueing_latency(args, &info, backend)?)
    } else {
        None
    };
    drop(guard);
    Ok(Round {
        backend: kind,
        paths: [path, blocking_path, busy_path],
        messages: total,
        secs,
        blocking,
        busy,
        queueing,
    })
}

/// How a measurement's messages travelled.
fn path_name(lane: bool) -> &'static str {
    if lane { "shared-memory lane" } else { "socket" }
}

/// A JSON string of `size` bytes (quotes included).
fn content_of(size: usize) -> String {
    format!("\"{}\"", "x".repeat(size.saturating_sub(2)))
}

/// Senders queue pre-serialized content as fast as they can; the
/// listener reads it in place. Returns seconds, messages, the backend and
/// the path the messages took.
fn throughput(
    args: &BenchArgs,
    info: &Info,
    backend: BackendChoice,
) -> Result<(f64, u64, String, &'static str), Fail> {
    let mut rx = Client::connect(info, "sink", args.opts(backend))?;
    let kind = rx.backend().to_string();
    let per_sender = args.messages().div_ceil(args.senders as u64);
    let total = per_sender * args.senders as u64;
    let body = content_of(args.size);
    let bar = indicatif::ProgressBar::new(total);
    if !std::io::stdout().is_terminal() || args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let sender_backend = args.sender_backend.map_or(backend, BackendChoice::from);
    let batch = args.flush_every();
    let start = Instant::now();
    let mut threads = Vec::new();
    for s in 0..args.senders {
        let info = info.clone();
        let body = body.clone();
        let blocking = args.blocking;
        let opts = args.opts(sender_backend);
        threads.push(std::thread::spawn(move || -> ipcm::Result<()> {
            // A bounded outbox: back-pressure as a socket buffer gives it.
            let opts = opts.listen(false).outbox_limit(256 * 1024);
            let mut tx = Client::connect(&info, &format!("source-{s}"), opts)?;
            tx.set_send_blocking(blocking);
            for n in 0..per_sender {
                if batch > 0 && n % batch == 0 {
                    tx.drain_pending();
                }
                loop {
                    let sent = if batch > 0 {
                        tx.queue_json("sink", &body)
                    } else {
                        tx.send_json("sink", &body)
                    };
                    match sent {
                        Ok(()) => break,
                        // The outbox is full: wait until it is written.
                        Err(ipcm::Error::WouldBlock { .. }) => {
                            tx.flush_pending(Some(Duration::from_secs(30)))?
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            tx.flush_pending(Some(Duration::from_secs(30)))?;
            tx.disconnect(None)
        }));
    }
    let mut got = 0u64;
    let mut bytes = 0usize;
    while got < total {
        let batch = rx.receive(Duration::from_secs(10))?;
        if batch.is_empty() {
            return Err(Fail(format!(
                "only {got} of {total} messages arrived (no progress for 10 s)"
            )));
        }
        let before = got;
        for m in &batch {
            bytes += m.content_json().len();
            got += 1;
        }
        drop(batch);
        bar.inc(got - before);
    }
    let secs = start.elapsed().as_secs_f64();
    std::hint::black_box(bytes);
    bar.finish_and_clear();
    let on_lanes = rx.resources().lanes;
    for t in threads {
        t.join()
            .map_err(|_| Fail("a sender thread panicked".into()))??;
    }
    rx.disconnect(None)?;
    Ok((secs, total, kind, path_name(on_lanes > 0)))
}

/// One message at a time, there and back: an echo client answers each
/// one; the round trips after the first tenth are the samples.
fn ping_pong(
    args: &BenchArgs,
    info: &Info,
    backend: BackendChoice,
    busy: bool,
) -> Result<(Samples, &'static str), Fail> {
    let opts = args.opts(backend).busy_poll(busy);
    let mut echo = Client::connect(info, "echo", opts.clone())?;
    let echo_thread = std::thread::spawn(move || -> ipcm::Result<()> {
        loop {
            for m in echo.get_messages_timeout(Duration::from_secs(10))? {
                if m.content_json() == "0" {
                    return echo.disconnect(None);
                }
                echo.send_json(m.from(), m.content_json())?;
            }
        }
    });
    let mut ping = Client::connect(info, "ping", opts.listen(false))?;
    let body = content_of(args.size);
    let warm = args.round_trips / 10;
    let mut lat = Vec::with_capacity(args.round_trips as usize);
    for i in 0..warm + args.round_trips {
        let t = Instant::now();
        ping.send_json("echo", &body)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while ping.receive(Duration::from_secs(10))?.is_empty() {
            if Instant::now() >= deadline {
                return Err(Fail("no echo for 10 s".into()));
            }
        }
        if i >= warm {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let lane = ping.lane("echo") == Some(ipcm::LaneKind::SharedMemory);
    ping.send_json("echo", "0")?;
    echo_thread
        .join()
        .map_err(|_| Fail("the echo thread panicked".into()))??;
    ping.disconnect(None)?;
    Ok((Samples::new(lat), path_name(lane)))
}

/// Senders saturate the listener with messages that carry their send
/// time; the samples are how long each waited in queues on the way.
fn queueing_latency(
    args: &BenchArgs,
    info: &Info,
    backend: BackendChoice,
) -> Result<Samples, Fail> {
    let mut rx = Client::connect(info, "sink", args.opts(backend))?;
    let per_sender = args.messages().div_ceil(args.senders as u64);
    let total = per_sender * args.senders as u64;
    let epoch = Instant::now();
    let pad = "x".repeat(args.size.saturating_sub(24));
    let sender_backend = args.sender_backend.map_or(backend, BackendChoice::from);
    let batch = args.flush_every();
    let mut threads = Vec::new();
    for s in 0..args.senders {
        let info = info.clone();
        let pad = pad.clone();
        let blocking = args.blocking;
        let opts = args.opts(sender_backend);
        threads.push(std::thread::spawn(move || -> ipcm::Result<()> {
            let opts = opts.listen(false);
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
            tx.flush_pending(Some(Duration::from_secs(30)))?;
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
    }
    for t in threads {
        t.join()
            .map_err(|_| Fail("a sender thread panicked".into()))??;
    }
    rx.disconnect(None)?;
    Ok(Samples::new(latency_us))
}

/// Removes a bench route however the round ends.
struct RouteGuard(Route);

impl Drop for RouteGuard {
    fn drop(&mut self) {
        let _ = self.0.unspawn();
    }
}
