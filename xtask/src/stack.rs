//! The local stack: a Kafka-protocol broker (tansu) and Redis on loopback.
//!
//! State lives in `target/dualstream-stack/`: `stack.env` (how to reach the
//! services) and one `*.pid` file per process that `up` started. `down` stops
//! exactly those processes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dualstream_devstack::ports::{self, Came};
use dualstream_devstack::{redis, tansu_pg};

const TANSU_VERSION: &str = "0.6.0";
/// tansu's features: `dynostore` for the in-memory engine, `postgres` for
/// the durable stack (`up --durable`) and `libsql` for its SQLite
/// alternative (`up --durable sqlite`); the broker-restart tests use both.
const TANSU_FEATURES: &str = "dynostore,libsql,postgres";
/// The cache folder's name says what the build holds.
fn tansu_root() -> PathBuf {
    cache_dir().join(format!("tansu-{TANSU_VERSION}-{}", TANSU_FEATURES.replace(',', "-")))
}
/// Where `up --durable` keeps the broker's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Durable {
    /// tansu's PostgreSQL engine, in the database DUALSTREAM_TANSU_PG (default: a local one).
    Postgres,
    /// tansu's SQLite engine, in target/dualstream-stack/durable/tansu.db.
    Sqlite,
}

/// Topics created on a broker that `up` starts.
const TOPICS: &[(&str, u32)] = &[("events", 3)];

/// Services that are up, and which of them this process started.
pub(crate) struct Stack {
    pub(crate) kafka_brokers: String,
    pub(crate) redis_url: String,
    tansu: Option<PathBuf>,
    started_here: Vec<PathBuf>,
}

impl Stack {
    /// Set the environment the tests, demo and benchmarks read.
    pub(crate) fn env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("KAFKA_BROKERS", &self.kafka_brokers).env("REDIS_URL", &self.redis_url);
        if let Some(t) = &self.tansu {
            cmd.env("DUALSTREAM_TANSU", t);
        }
        cmd
    }

    pub(crate) fn print(&self) {
        println!("stack is up:");
        println!("  KAFKA_BROKERS={}", self.kafka_brokers);
        println!("  REDIS_URL={}", self.redis_url);
        println!("use them with:  eval \"$(cat {})\"", state_dir().join("stack.env").display());
        println!("stop with:      cargo xtask down");
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn state_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("dualstream-stack")
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("dualstream")
}

pub(crate) fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
}

/// Where tansu is, without installing it.
fn find_tansu() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DUALSTREAM_TANSU").map(PathBuf::from).filter(|p| p.is_file()) {
        return Some(p);
    }
    let cached = tansu_root().join("bin").join("tansu");
    if cached.is_file() {
        return Some(cached);
    }
    which("tansu")
}

/// Install tansu into the cache folder (reused when present).
pub(crate) fn install_tansu() -> Result<PathBuf, String> {
    if let Some(p) = find_tansu() {
        return Ok(p);
    }
    let root = tansu_root();
    eprintln!(
        "xtask: tansu {TANSU_VERSION} (the Kafka-compatible broker) is not installed; installing it into {} \
         (11 to 17 minutes on 2 cores, once)",
        root.display()
    );
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "tansu", "--version", TANSU_VERSION, "--locked", "--features", TANSU_FEATURES, "--root"])
        .arg(&root)
        .status()
        .map_err(|e| format!("could not run cargo install: {e}"))?;
    if !status.success() {
        return Err(format!(
            "installing tansu failed ({status}). Install it by hand with \
             `cargo install tansu --version {TANSU_VERSION} --locked --features {TANSU_FEATURES} --root {}`, \
             or point KAFKA_BROKERS at a broker of your own",
            root.display()
        ));
    }
    find_tansu().ok_or_else(|| "tansu was installed but cannot be found".to_owned())
}

/// A port nobody listened on a moment ago. Another process may take it
/// before the server binds it: see [`start_on_free_port`].
fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// How often a service is started on another port after it could not
/// listen on the one chosen.
const START_ATTEMPTS: usize = 5;

/// Start `name` on a free port with `spawn_on(port)` (which returns its
/// pid). It is up once it listens on the port itself; if it exits first
/// (the port was taken between choosing and binding it), it is started
/// again on another port.
fn start_on_free_port(
    name: &str,
    timeout: Duration,
    mut spawn_on: impl FnMut(u16) -> Result<u32, String>,
) -> Result<(u16, u32), String> {
    let mut failures = Vec::new();
    for _ in 0..START_ATTEMPTS {
        let port = free_port()?;
        let pid = spawn_on(port)?;
        let log = || log_tail(name);
        match ports::wait_listening(pid, port, timeout, || !alive(pid)) {
            Came::Listening => return Ok((port, pid)),
            Came::Exited => failures.push(format!("port {port}: exited; its log says:\n{}", log())),
            Came::TimedOut => {
                return Err(format!("{name} did not listen on {port} within {timeout:?}; its log says:\n{}", log()))
            }
        }
    }
    Err(format!("{name} could not listen on a free port in {START_ATTEMPTS} attempts:\n{}", failures.join("\n")))
}

fn spawn(name: &str, cmd: &mut Command) -> Result<u32, String> {
    let dir = state_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    use std::os::unix::process::CommandExt;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("could not start {name}: {e}"))?;
    let pid = child.id();
    std::fs::write(dir.join(format!("{name}.pid")), pid.to_string()).map_err(|e| e.to_string())?;
    Ok(pid)
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false)
}

fn log_tail(name: &str) -> String {
    let text = std::fs::read_to_string(state_dir().join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Wait for `check` to pass, failing early if `pid` dies.
fn wait_for(name: &str, pid: Option<u32>, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<(), String> {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if check() {
            return Ok(());
        }
        if let Some(pid) = pid {
            if !alive(pid) {
                return Err(format!("{name} exited during start-up; its log says:\n{}", log_tail(name)));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("{name} did not answer within {timeout:?}; its log says:\n{}", log_tail(name)))
}

fn redis_addr(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let hostport = rest.split('/').next().unwrap_or(rest);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:6379")
    }
}

fn redis_pings(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 64];
    s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).map(|n| buf[..n].starts_with(b"+PONG")).unwrap_or(false)
}

fn connects(addr: &str) -> bool {
    addr.split(',').all(|a| TcpStream::connect(a.trim()).is_ok())
}

fn read_state() -> Option<(String, String)> {
    let text = std::fs::read_to_string(state_dir().join("stack.env")).ok()?;
    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(&format!("export {k}=")).map(str::to_owned));
    Some((get("KAFKA_BROKERS")?, get("REDIS_URL")?))
}

/// Bring the stack up, or reuse one that is already up.
/// Masters of the local Redis Cluster (`up --redis-cluster`).
const CLUSTER_NODES: usize = 3;

/// Start a Redis Cluster of [`CLUSTER_NODES`] masters on loopback (each with
/// its cluster bus on a port of its own), join them, and wait until every
/// node reports `cluster_state:ok`. Returns the nodes' URLs.
fn start_redis_cluster(started_here: &mut Vec<PathBuf>) -> Result<Vec<String>, String> {
    let cli =
        which("redis-cli").ok_or("redis-cli not found: install it (Debian/Ubuntu: `apt-get install redis-tools`)")?;
    let mut addrs = Vec::new();
    for i in 0..CLUSTER_NODES {
        let name = format!("redis-cluster-{i}");
        let node_dir = state_dir().join(&name);
        // A fresh cluster every time: no node file from an earlier run.
        let _ = std::fs::remove_dir_all(&node_dir);
        std::fs::create_dir_all(&node_dir).map_err(|e| format!("{}: {e}", node_dir.display()))?;
        let (port, _pid) = start_on_free_port(&name, Duration::from_secs(10), |port| {
            spawn(&name, &mut redis::cluster_node_command(port, free_port()?, &node_dir))
        })?;
        started_here.push(state_dir().join(format!("{name}.pid")));
        addrs.push(format!("127.0.0.1:{port}"));
    }
    let out = Command::new(&cli)
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("redis-cli --cluster create: {e}"))?;
    if !out.status.success() {
        return Err(format!("redis-cli --cluster create failed: {}", String::from_utf8_lossy(&out.stdout)));
    }
    for addr in &addrs {
        let port = addr.rsplit(':').next().unwrap_or_default().to_owned();
        wait_for("redis cluster", None, Duration::from_secs(20), || {
            Command::new(&cli)
                .args(["-p", &port, "cluster", "info"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
                .unwrap_or(false)
        })?;
    }
    Ok(addrs.into_iter().map(|a| format!("redis://{a}")).collect())
}

/// The broker's `--storage-engine` and working directory. Durable: the log
/// outlives the broker and `down`.
fn broker_storage(durable: Option<Durable>, dir: &Path) -> Result<(String, PathBuf), String> {
    Ok(match durable {
        Some(Durable::Postgres) => {
            let url = tansu_pg::url_from_env();
            let created = tansu_pg::prepare(&url).map_err(|e| e.to_string())?;
            let how = if created { "created, " } else { "" };
            eprintln!("xtask: durable broker: the log is kept in PostgreSQL, {url} ({how}schema applied)");
            (url, dir.to_owned())
        }
        Some(Durable::Sqlite) => {
            // tansu 0.6 reads the path relative to its working directory.
            let d = dir.join("durable");
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            eprintln!("xtask: durable broker: the log is kept in {}", d.join("tansu.db").display());
            ("sqlite://tansu.db".to_owned(), d)
        }
        None => ("memory://tansu/".to_owned(), dir.to_owned()),
    })
}

pub(crate) fn up(durable: Option<Durable>, redis_cluster: bool) -> Result<Stack, String> {
    let tansu_known = find_tansu();
    if let Some((kafka, redis)) = read_state() {
        if connects(&kafka) && redis_pings(&redis_addr(&redis)) {
            eprintln!("xtask: reusing the running stack ({kafka}, {redis})");
            return Ok(Stack { kafka_brokers: kafka, redis_url: redis, tansu: tansu_known, started_here: vec![] });
        }
        down()?;
    }
    let dir = state_dir();
    // The broker's storage first: a durable one whose database cannot be
    // made ready stops `up` before anything is started.
    let storage = match std::env::var("KAFKA_BROKERS") {
        Ok(_) => None,
        Err(_) => Some(broker_storage(durable, &dir)?),
    };
    let mut started_here = Vec::new();

    let redis_url = match std::env::var("REDIS_URL") {
        Ok(url) => {
            let addr = redis_addr(&url);
            wait_for("redis", None, Duration::from_secs(5), || redis_pings(&addr))
                .map_err(|_| format!("REDIS_URL={url} does not answer PING"))?;
            url
        }
        Err(_) => {
            which("redis-server")
                .ok_or(format!("redis-server not found: install it ({}) or set REDIS_URL", redis::INSTALL_HINT))?;
            let (port, pid) = start_on_free_port("redis", Duration::from_secs(10), |port| {
                spawn("redis", &mut redis::server_command(port))
            })?;
            started_here.push(dir.join("redis.pid"));
            let addr = format!("127.0.0.1:{port}");
            wait_for("redis", Some(pid), Duration::from_secs(10), || redis_pings(&addr))?;
            format!("redis://{addr}")
        }
    };

    let redis_cluster_urls = if redis_cluster {
        which("redis-server").ok_or(format!("redis-server not found: install it ({})", redis::INSTALL_HINT))?;
        Some(start_redis_cluster(&mut started_here)?.join(","))
    } else {
        None
    };

    let (kafka_brokers, tansu) = match std::env::var("KAFKA_BROKERS") {
        Ok(brokers) => {
            wait_for("kafka", None, Duration::from_secs(10), || connects(&brokers))
                .map_err(|_| format!("KAFKA_BROKERS={brokers} does not accept connections"))?;
            (brokers, tansu_known)
        }
        Err(_) => {
            let tansu = install_tansu()?;
            let (storage, workdir) = storage.ok_or("no storage chosen for the broker")?;
            std::fs::create_dir_all(&workdir).map_err(|e| e.to_string())?;
            let (port, pid) = start_on_free_port("tansu", Duration::from_secs(30), |port| {
                spawn("tansu", &mut dualstream_devstack::tansu::broker_command(&tansu, port, &storage, &workdir, None))
            })?;
            started_here.push(dir.join("tansu.pid"));
            let url = format!("tcp://127.0.0.1:{port}");
            let addr = format!("127.0.0.1:{port}");
            for (topic, partitions) in TOPICS {
                wait_for("tansu", Some(pid), Duration::from_secs(30), || {
                    // A durable broker keeps its topics: "already exists" is fine.
                    Command::new(&tansu)
                        .args(["topic", "create", topic, "--partitions", &partitions.to_string(), "--broker", &url])
                        .stdin(Stdio::null())
                        .output()
                        .map(|o| {
                            o.status.success()
                                || String::from_utf8_lossy(&o.stderr).contains("already exists")
                                || String::from_utf8_lossy(&o.stdout).contains("already exists")
                        })
                        .unwrap_or(false)
                })
                .map_err(|e| format!("creating topic {topic}: {e}"))?;
            }
            (addr, Some(tansu))
        }
    };

    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut env = format!("export KAFKA_BROKERS={kafka_brokers}\nexport REDIS_URL={redis_url}\n");
    if let Some(urls) = &redis_cluster_urls {
        env.push_str(&format!("export REDIS_CLUSTER_URLS={urls}\n"));
        println!("  REDIS_CLUSTER_URLS={urls} (3 masters; sharded Pub/Sub: the notifier's and hub's `cluster_urls`)");
    }
    if let Some(t) = &tansu {
        env.push_str(&format!("export DUALSTREAM_TANSU={}\n", t.display()));
    }
    std::fs::write(dir.join("stack.env"), env).map_err(|e| e.to_string())?;
    Ok(Stack { kafka_brokers, redis_url, tansu, started_here })
}

fn stop_pid_file(pid_file: &Path) -> Result<(), String> {
    let Ok(text) = std::fs::read_to_string(pid_file) else { return Ok(()) };
    let _ = std::fs::remove_file(pid_file);
    let Ok(pid) = text.trim().parse::<u32>() else { return Ok(()) };
    // Only ever signal the process we started (pids are reused).
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !(cmdline.contains("tansu") || cmdline.contains("redis-server")) {
        return Ok(());
    }
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let until = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    Ok(())
}

/// Stop the processes this call's `up` started.
pub(crate) fn down_started(stack: &Stack) -> Result<(), String> {
    for pid_file in &stack.started_here {
        stop_pid_file(pid_file)?;
    }
    if !stack.started_here.is_empty() {
        let _ = std::fs::remove_file(state_dir().join("stack.env"));
    }
    Ok(())
}

/// Delete the durable broker's log: the PostgreSQL database of
/// DUALSTREAM_TANSU_PG (or the default one) and the SQLite folder. A
/// PostgreSQL that is not there is left alone with a note.
pub(crate) fn wipe_durable() -> Result<(), String> {
    let sqlite = state_dir().join("durable");
    if sqlite.exists() {
        std::fs::remove_dir_all(&sqlite).map_err(|e| format!("{}: {e}", sqlite.display()))?;
        println!("removed {}", sqlite.display());
    }
    let url = tansu_pg::url_from_env();
    match tansu_pg::drop_database(&url) {
        Ok(()) => println!("dropped the database of {url} (if it existed)"),
        Err(e @ (tansu_pg::PgError::NoPsql | tansu_pg::PgError::Unreachable { .. })) => {
            eprintln!("xtask: nothing dropped in PostgreSQL: {e}")
        }
        Err(e) => return Err(e.to_string()),
    }
    Ok(())
}

/// Stop every process `up` started (per the pid files), and nothing else.
pub(crate) fn down() -> Result<(), String> {
    let dir = state_dir();
    for name in ["tansu", "redis", "redis-cluster-0", "redis-cluster-1", "redis-cluster-2"] {
        stop_pid_file(&dir.join(format!("{name}.pid")))?;
    }
    let _ = std::fs::remove_file(dir.join("stack.env"));
    println!("stack is down");
    Ok(())
}
