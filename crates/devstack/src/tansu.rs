//! tansu, the Kafka-compatible broker: the one command line it is started
//! with (the fixtures and `cargo xtask up`), and [`OwnedBroker`], a test's
//! or run's own broker.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::owned::{restart_on, signal, start_on_own_port, PortHold};
use crate::tansu_pg;

/// `tansu broker` on loopback `port` with `storage` (`memory://tansu/`,
/// `sqlite://tansu.db`, a `postgres://` URL), working in `dir` (tansu 0.6
/// reads a SQLite path relative to it), telling clients to connect to
/// `advertised` instead of `port` when given (a proxy in front of it).
pub fn broker_command(tansu: &Path, port: u16, storage: &str, dir: &Path, advertised: Option<u16>) -> Command {
    let url = format!("tcp://127.0.0.1:{port}");
    let advertised = format!("tcp://127.0.0.1:{}", advertised.unwrap_or(port));
    let mut cmd = Command::new(tansu);
    cmd.current_dir(dir).args(["broker", "--storage-engine", storage]).args([
        "--listener-url",
        &url,
        "--advertised-listener-url",
        &advertised,
    ]);
    cmd
}

/// Where a durable test broker ([`OwnedBroker::start_durable`]) keeps its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DurableEngine {
    /// tansu's PostgreSQL engine, in a database of the broker's own (created
    /// with our schema, dropped with the fixture) on the server of
    /// `DUALSTREAM_TANSU_PG`, by default the local one.
    Postgres,
    /// tansu's SQLite engine, in a file in a folder of the broker's own
    /// (removed with the fixture).
    Sqlite,
}

/// A tansu broker owned by one test (in-memory storage, or a durable log
/// with [`OwnedBroker::start_durable`]), on a port reserved for it until the
/// fixture is dropped (see [`PortHold`]).
#[derive(Debug)]
pub struct OwnedBroker {
    pub port: u16,
    child: Option<Child>,
    tansu: PathBuf,
    storage: String,
    /// The broker's working directory (its SQLite file, when durable).
    dir: PathBuf,
    /// What the fixture removes when dropped: the broker's own folder, its
    /// own database (URL).
    own_dir: bool,
    own_database: Option<String>,
    /// The port clients are told to use, when it is not the broker's own (a
    /// proxy in front of it).
    advertised: Option<u16>,
    _hold: PortHold,
}

fn spawn_tansu(tansu: &Path, port: u16, storage: &str, dir: &Path, advertised: Option<u16>) -> Child {
    broker_command(tansu, port, storage, dir, advertised)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tansu")
}

impl OwnedBroker {
    const START_TIMEOUT: Duration = Duration::from_secs(20);

    /// Run `sql` on the broker's own PostgreSQL database (a durable broker
    /// on PostgreSQL only): psql's unaligned output, `|` between columns.
    /// For a witness that reads what the broker stored, beside the Kafka
    /// protocol.
    pub fn query_own_database(&self, sql: &str) -> Result<String, String> {
        let url = self.own_database.as_deref().ok_or("this broker keeps no PostgreSQL database of its own")?;
        tansu_pg::query(url, sql).map_err(|e| e.to_string())
    }

    pub fn start() -> Self {
        Self::start_with("memory://tansu/".to_owned(), std::env::temp_dir(), None)
    }

    /// A broker that keeps its log in storage of its own, in PostgreSQL or
    /// in SQLite: a restart keeps topics, records and producer state, as a
    /// real Kafka broker's disk does.
    pub fn start_durable(engine: DurableEngine) -> Self {
        Self::start_durable_advertised(engine, None)
    }

    /// Like [`start_durable`](Self::start_durable), telling clients (in its
    /// metadata) to connect to `advertised` on loopback instead of its own
    /// port: a proxy there (`DelayProxy::start_on`, feature `proxy`) then carries
    /// every connection to the broker, so the proxy can cut them.
    pub fn start_durable_advertised(engine: DurableEngine, advertised: Option<u16>) -> Self {
        let id = crate::unique_suffix();
        match engine {
            DurableEngine::Postgres => {
                let url = tansu_pg::with_database(&tansu_pg::url_from_env(), &format!("dualstream_test_{id}"))
                    .and_then(|url| tansu_pg::prepare(&url).map(|_| url))
                    .unwrap_or_else(|e| panic!("the durable broker's database: {e}"));
                let mut broker = Self::start_with(url.clone(), std::env::temp_dir(), advertised);
                broker.own_database = Some(url);
                broker
            }
            DurableEngine::Sqlite => {
                let dir = std::env::temp_dir().join(format!("dualstream-broker-{id}"));
                std::fs::create_dir_all(&dir).expect("broker dir");
                // tansu 0.6 reads the SQLite path relative to its working directory.
                let mut broker = Self::start_with("sqlite://tansu.db".to_owned(), dir, advertised);
                broker.own_dir = true;
                broker
            }
        }
    }

    fn start_with(storage: String, dir: PathBuf, advertised: Option<u16>) -> Self {
        let tansu = std::env::var_os("DUALSTREAM_TANSU")
            .map(PathBuf::from)
            .expect("DUALSTREAM_TANSU is not set: run with `cargo xtask test`, which installs tansu");
        let (hold, child) = start_on_own_port("test broker", Self::START_TIMEOUT, |port| {
            spawn_tansu(&tansu, port, &storage, &dir, advertised)
        });
        let (own_dir, own_database) = (false, None);
        Self {
            port: hold.port,
            child: Some(child),
            tansu,
            storage,
            dir,
            own_dir,
            own_database,
            advertised,
            _hold: hold,
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Start again on the same port. In-memory storage: topics must be
    /// created again after a restart.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = spawn_tansu(&self.tansu, self.port, &self.storage, &self.dir, self.advertised);
        self.child = Some(restart_on("test broker", self.port, Self::START_TIMEOUT, child));
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the broker stops answering but keeps its state (tansu's
    /// in-memory storage would lose the log and the producer state on a
    /// restart, which a real Kafka broker keeps on disk).
    pub fn stop(&self) {
        signal(self.child.as_ref(), "-STOP");
    }

    /// SIGCONT: the stopped broker answers again.
    pub fn resume(&self) {
        signal(self.child.as_ref(), "-CONT");
    }
}

impl Drop for OwnedBroker {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.resume();
        }
        self.kill();
        if let Some(url) = self.own_database.take() {
            if let Err(e) = tansu_pg::drop_database(&url) {
                eprintln!("the test broker's database is left: {e}");
            }
        }
        if self.own_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
