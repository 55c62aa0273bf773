//! `cargo xtask`: the local stack, tests, the demo and benchmarks.
//!
//! Bare `cargo xtask` prints help. Every command that needs services brings
//! them up through [`stack`] and takes down only what it started.

mod arch;
mod fuzz;
mod gateway;
mod preflight;
mod reliability;
mod stack;

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "dualstream developer tasks", arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a Kafka-compatible broker (tansu) and Redis on loopback, create the topics,
    /// and print how to reach them. Honours KAFKA_BROKERS and REDIS_URL.
    Up {
        /// Keep the broker's log where a broker restart finds it: `postgres` (the
        /// default) in the PostgreSQL database DUALSTREAM_TANSU_PG (default
        /// postgres://postgres@127.0.0.1:5432/dualstream_tansu?sslmode=disable; created
        /// when missing, given tansu's schema), or `sqlite` in
        /// target/dualstream-stack/durable/tansu.db. Kept by `down`; `down --wipe` deletes it.
        #[arg(long, value_enum, value_name = "ENGINE", num_args = 0..=1, default_missing_value = "postgres")]
        durable: Option<stack::Durable>,
        /// Also start a Redis Cluster of 3 masters on loopback (for sharded
        /// Pub/Sub); its URLs go to REDIS_CLUSTER_URLS in stack.env.
        #[arg(long)]
        redis_cluster: bool,
    },
    /// Stop what `up` started, and nothing else.
    Down {
        /// Also delete the durable broker's log: drop the database DUALSTREAM_TANSU_PG (or the
        /// default one) and remove target/dualstream-stack/durable/.
        #[arg(long)]
        wipe: bool,
    },
    /// Bring the stack up, run every test of the workspace, bring down what was started. First checks
    /// that redis-server, Chromium with chromedriver and PostgreSQL (127.0.0.1:5432, or DATABASE_URL and
    /// DUALSTREAM_TANSU_PG) are there: run as root with apt-get, installs what is missing; otherwise stops
    /// at once with the one command that does it. Then installs tansu when missing.
    Test {
        /// Run only these integration-test targets of `dualstream-tests` (for example `consumer`,
        /// `gateway`) and these packages' unit tests (`-p`-style names such as `dualstream-consumer`),
        /// instead of the whole workspace.
        #[arg(long = "only", value_name = "TARGET")]
        only: Vec<String>,
        /// Keep this many busy loops (`sh -c 'while :; do :; done'`) running beside the tests:
        /// idle cores hide races.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=64))]
        busy: u32,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The end-to-end demo: publish through the batching engine and the dual publisher,
    /// survive a Redis outage, and read everything back from Kafka.
    Demo {
        /// Seconds to publish for.
        #[arg(long, default_value_t = 12)]
        seconds: u64,
        /// Events per second to offer.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        /// The Kafka broker: `mock` (librdkafka's in-process mock cluster, nothing
        /// to install) or `tansu` (the local stack's real broker). Setting
        /// KAFKA_BROKERS selects that broker instead.
        #[arg(long, value_enum, default_value_t = Broker::Mock)]
        broker: Broker,
        /// Build the demo in release (optimised; a longer first build). By default it is the debug build,
        /// the quickest first build, whose dependencies `cargo xtask test` then reuses.
        #[arg(long)]
        release: bool,
    },
    /// Run the gateway (ingest, SSE, WebSocket, live dashboard) and print its URLs, a sample token and
    /// curl commands. Ctrl-C stops it.
    Gateway {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// The Kafka broker, as for `demo`: `mock` runs librdkafka's mock cluster inside the gateway.
        #[arg(long, value_enum, default_value_t = Broker::Mock)]
        broker: Broker,
    },
    /// Benchmarks against the raw clients: writes docs/benchmarks.md and target/bench/*.json.
    Bench {
        /// Longer runs.
        #[arg(long)]
        full: bool,
        /// Run only the groups whose name contains one of these words (groups: micro, memory,
        /// latency, durable, dual, realtime, slow, outage, naive, fanout, cluster, joins, gateway).
        #[arg(long)]
        filter: Vec<String>,
    },
    /// Install the tansu broker into the cache folder (11 to 17 minutes on 2 cores).
    InstallTansu,
    /// Publish through the batching engine from many sources while catch-up joins come and go,
    /// under seeded faults (Redis kill -9, SIGSTOP, slowed, DEBUG SLEEP; broker SIGSTOP, kill -9 and
    /// restart on durable storage, connections cut), on a tansu and a redis-server of the run's own;
    /// then read Kafka with an independent consumer and count anomalies (lost, duplicate, out of
    /// order, failed but stored, bad notification, join gap or duplicate). Exits 1 on any anomaly.
    Chaos {
        /// The fault schedule's seed (default: from the clock; printed, so a failure can be replayed).
        #[arg(long)]
        seed: Option<u64>,
        /// How long the load and the faults run, in minutes.
        #[arg(long, default_value_t = 2.0)]
        minutes: f64,
        /// Events per second offered.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        /// Keep the broker's log in SQLite instead of PostgreSQL.
        #[arg(long)]
        sqlite: bool,
        /// Run the debug build (no release build; slower, what CI runs).
        #[arg(long)]
        debug: bool,
        /// Run this many seeds, each on a fresh broker, database and Redis (from --seed upwards,
        /// or drawn from the clock), and print a table of their anomaly counts.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        seeds: u32,
        /// Leave these fault kinds out of the schedule (comma-separated: redis-kill, redis-hang,
        /// redis-slow, redis-debug-sleep, broker-hang, broker-kill, broker-cut).
        #[arg(long)]
        without: Option<String>,
        /// Keep this many busy loops (`sh -c 'while :; do :; done'`) running beside the runs:
        /// idle cores hide races.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=64))]
        busy: u32,
        /// Clients of a gateway process of the run's own (SSE and WebSocket, notify and full mode),
        /// resuming with their tokens throughout; 0 runs no gateway (and no gateway-kill fault).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=64))]
        gateway_clients: u32,
    },
    /// Steady load with a Redis kill -9 and restart every minute, sampling RSS, the engine's queue
    /// depth, open descriptors and the Kafka and Redis connections every 5 s; prints each one's slope
    /// and fails when one keeps growing (or on any anomaly of the chaos checker).
    Soak {
        /// How long, in minutes.
        #[arg(long, default_value_t = 15.0)]
        minutes: f64,
        /// Events per second offered.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        /// Run the debug build.
        #[arg(long)]
        debug: bool,
    },
    /// Run each cargo-fuzz target of fuzz/ (event_record, notification, channel_parse, config,
    /// gateway_ingest) for a bounded time from its seeds in fuzz/corpus/; fails on a crash. Installs
    /// cargo-fuzz when missing; builds with ASAN into fuzz/target (a few minutes the first time).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Only these targets.
        targets: Vec<String>,
    },
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// A seed from the clock (printed by the run, so it can be replayed).
fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("could not run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{:?} failed with {status}", cmd.get_program()))
    }
}

/// Run a `cargo test`, echoing its output, and add up its "test result"
/// lines into `totals` (passed, failed).
fn run_tests(cmd: &mut Command, totals: &mut (u64, u64)) -> Result<(), String> {
    use std::io::BufRead;
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).spawn().map_err(|e| format!("could not run cargo test: {e}"))?;
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                let count = |word: &str| {
                    rest.split(';')
                        .find_map(|part| {
                            part.trim()
                                .strip_suffix(word)
                                .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                        })
                        .unwrap_or(0)
                };
                totals.0 += count(" passed");
                totals.1 += count(" failed");
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo test failed with {status}"))
    }
}

/// Run `f` with the stack up, then take down what this call started.
/// The Kafka broker of `cargo xtask demo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Broker {
    /// librdkafka's in-process mock cluster.
    Mock,
    /// tansu, started by the local stack (installed on first use).
    Tansu,
}

fn with_stack(f: impl FnOnce(&stack::Stack) -> Result<(), String>) -> Result<(), String> {
    let stack = stack::up(None, false)?;
    let result = f(&stack);
    if let Err(e) = stack::down_started(&stack) {
        eprintln!("xtask: while stopping the stack: {e}");
    }
    result
}

/// The harness binaries `cargo xtask test` tests beside the workspace's targets: the chaos run's
/// (its checker's and decoder's unit tests). The bench's are built only by `cargo xtask bench`.
const HARNESS_TESTED: [&str; 2] = ["--features", "dualstream-harness/chaos"];

/// `cargo xtask test --only ...`: these integration-test targets and packages' unit tests.
fn test_only(only: &[String], busy: u32, args: &[String]) -> Result<(), String> {
    preflight::ensure(only).and_then(|()| stack::install_tansu()).and_then(|_| {
        with_stack(|s| {
            let mut totals = (0, 0);
            // The harness has binaries and no library: its tests are a run of their own.
            let (harness, only): (Vec<&String>, Vec<&String>) =
                only.iter().partition(|t| t.as_str() == "dualstream-harness");
            let mut cmds = Vec::new();
            if !only.is_empty() {
                let mut cmd = cargo();
                cmd.args(["test", "--no-fail-fast"]);
                for t in &only {
                    if t.starts_with("dualstream-") {
                        cmd.args(["-p", t]);
                    } else {
                        cmd.args(["-p", "dualstream-tests", "--test", t]);
                    }
                }
                if only.iter().any(|t| t.starts_with("dualstream-")) {
                    // Once: cargo refuses `--lib` given twice.
                    cmd.arg("--lib");
                }
                cmds.push(cmd);
            }
            if !harness.is_empty() {
                let mut cmd = cargo();
                cmd.args(["test", "--no-fail-fast", "-p", "dualstream-harness", "--bins"]).args(HARNESS_TESTED);
                cmds.push(cmd);
            }
            let _busy = reliability::Busy::start(busy as usize)?;
            let mut result = Ok(());
            for mut cmd in cmds {
                if !args.is_empty() {
                    cmd.arg("--").args(args);
                }
                result = result.and(run_tests(s.env(&mut cmd), &mut totals));
            }
            println!("xtask: {} passed, {} failed", totals.0, totals.1);
            result
        })
    })
}

/// `cargo xtask test`: every test of the workspace, and the doc tests.
fn test_all(only: &[String], busy: u32, args: &[String]) -> Result<(), String> {
    preflight::ensure(only).and_then(|()| stack::install_tansu()).and_then(|_| {
        with_stack(|s| {
            let _busy = reliability::Busy::start(busy as usize)?;
            let mut totals = (0, 0);
            let unit = run_tests(
                s.env(
                    cargo()
                        .args(["test", "--workspace", "--all-targets", "--no-fail-fast"])
                        .args(HARNESS_TESTED)
                        .args(args),
                ),
                &mut totals,
            );
            let doc = run_tests(s.env(cargo().args(["test", "--workspace", "--doc"])), &mut totals);
            println!("xtask: {} passed, {} failed", totals.0, totals.1);
            unit.and(doc)
        })
    })
}

/// `cargo xtask demo`: the harness's demo (the debug build unless `release`: 2,000 events/s need no
/// optimiser, and the debug build's dependencies serve `cargo xtask test` next), on the mock cluster or
/// the stack.
fn demo(seconds: u64, rate: u64, broker: Broker, release: bool) -> Result<(), String> {
    let mut demo = cargo();
    demo.args(["run", "--quiet", "-p", "dualstream-harness", "--bin", "demo"]);
    if release {
        demo.arg("--release");
    }
    demo.arg("--").args(["--seconds".to_owned(), seconds.to_string(), "--rate".to_owned(), rate.to_string()]);
    if broker == Broker::Mock && std::env::var_os("KAFKA_BROKERS").is_none() {
        // The demo starts its own redis-server; no stack, no tansu.
        run(demo.args(["--broker", "mock"]))
    } else {
        with_stack(|s| run(s.env(demo.args(["--broker", "env"]))))
    }
}

/// `cargo xtask chaos`'s arguments.
struct Chaos {
    seed: Option<u64>,
    minutes: f64,
    rate: u64,
    sqlite: bool,
    debug: bool,
    seeds: u32,
    without: Option<String>,
    busy: u32,
    gateway_clients: u32,
}

/// `cargo xtask chaos`: the chaos binary's arguments, once per seed.
fn chaos(c: Chaos) -> Result<(), String> {
    let Chaos { seed, minutes, rate, sqlite, debug, seeds, without, busy, gateway_clients } = c;
    let mut args = vec![
        "--minutes".to_owned(),
        minutes.to_string(),
        "--rate".to_owned(),
        rate.to_string(),
        "--gateway-clients".to_owned(),
        gateway_clients.to_string(),
    ];
    if sqlite {
        args.push("--sqlite".to_owned());
    }
    if let Some(w) = without {
        args.extend(["--without".to_owned(), w]);
    }
    let first = seed.unwrap_or_else(clock_seed);
    let seeds = if seed.is_none() && seeds == 1 {
        Vec::new()
    } else {
        (0..u64::from(seeds)).map(|i| first.wrapping_add(i)).collect()
    };
    reliability::run_chaos(reliability::Plan { args, debug, seeds, busy: busy as usize })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Up { durable, redis_cluster } => stack::up(durable, redis_cluster).map(|s| s.print()),
        Cmd::Down { wipe } => stack::down().and_then(|()| if wipe { stack::wipe_durable() } else { Ok(()) }),
        Cmd::InstallTansu => stack::install_tansu().map(|p| println!("tansu: {}", p.display())),
        Cmd::Test { only, busy, args } if !only.is_empty() => test_only(&only, busy, &args),
        Cmd::Test { only, busy, args } => test_all(&only, busy, &args),
        Cmd::Demo { seconds, rate, broker, release } => demo(seconds, rate, broker, release),
        Cmd::Gateway { listen, broker } => gateway::run(listen, broker),
        Cmd::Fuzz { seconds, targets } => fuzz::run(seconds, &targets),
        Cmd::Chaos { seed, minutes, rate, sqlite, debug, seeds, without, busy, gateway_clients } => {
            chaos(Chaos { seed, minutes, rate, sqlite, debug, seeds, without, busy, gateway_clients })
        }
        Cmd::Soak { minutes, rate, debug } => reliability::run_chaos(reliability::Plan {
            args: vec![
                "--soak".to_owned(),
                "--minutes".to_owned(),
                minutes.to_string(),
                "--rate".to_owned(),
                rate.to_string(),
            ],
            debug,
            seeds: Vec::new(),
            busy: 0,
        }),
        Cmd::Bench { full, filter } => with_stack(|s| {
            if filter.is_empty() || filter.iter().any(|f| "micro".contains(f.as_str())) {
                let time = if full { "5" } else { "2" };
                let timing = ["--warm-up-time", "1", "--measurement-time", time];
                run(cargo().args(["bench", "-p", "dualstream", "--bench", "micro", "--"]).args(timing))?;
                // The engine rows again with the `otel` feature: its cost untraced, and with every
                // event in a sampled trace (docs/observability.md, "Trace context").
                let otel = ["bench", "-p", "dualstream", "--bench", "micro", "--features", "otel", "--", "engine"];
                run(cargo().args(otel).args(timing))?;
            }
            let mut cmd = cargo();
            cmd.args([
                "run",
                "--release",
                "--quiet",
                "-p",
                "dualstream-harness",
                "--features",
                "bench",
                "--bin",
                "bench",
                "--",
            ]);
            if full {
                cmd.arg("--full");
            }
            for f in &filter {
                cmd.args(["--filter", f]);
            }
            run(s.env(&mut cmd))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
