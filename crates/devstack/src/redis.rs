//! redis-server: the one command line every caller starts it with (the
//! fixtures, the Redis Cluster's nodes, `cargo xtask up` and `cargo xtask
//! gateway`), and [`OwnedRedis`], a test's or run's own server.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::owned::{restart_on, signal, start_on_own_port, PortHold};

/// `redis-server` on loopback `port`, keeping nothing on disk (no RDB
/// snapshots, no AOF). Standard input and output are left to the caller.
pub fn server_command(port: u16) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
    cmd
}

/// [`server_command`] for a node of a Redis Cluster: its cluster bus on
/// `bus` (not `port + 10000`, which may be in the ephemeral range), its
/// node file `nodes-<port>.conf` in `dir`.
pub fn cluster_node_command(port: u16, bus: u16, dir: &Path) -> Command {
    let mut cmd = server_command(port);
    cmd.args(["--cluster-enabled", "yes", "--cluster-port", &bus.to_string()])
        .arg("--cluster-config-file")
        .arg(dir.join(format!("nodes-{port}.conf")))
        .arg("--dir")
        .arg(dir);
    cmd
}

/// The hint every caller gives when redis-server is missing.
pub const INSTALL_HINT: &str = "Debian/Ubuntu: `apt-get install redis-server`";

/// A `redis-server` owned by one test, on a port reserved for it until the
/// fixture is dropped (see [`PortHold`]). Killed on drop.
#[derive(Debug)]
pub struct OwnedRedis {
    pub port: u16,
    child: Option<Child>,
    _hold: PortHold,
}

fn spawn_redis(port: u16) -> Child {
    server_command(port)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("redis-server on PATH ({INSTALL_HINT}): {e}"))
}

impl OwnedRedis {
    const START_TIMEOUT: Duration = Duration::from_secs(10);

    pub fn start() -> Self {
        let (hold, child) = start_on_own_port("test redis", Self::START_TIMEOUT, spawn_redis);
        Self { port: hold.port, child: Some(child), _hold: hold }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Start again on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.child = Some(restart_on("test redis", self.port, Self::START_TIMEOUT, spawn_redis(self.port)));
    }

    /// SIGSTOP: Redis hangs (connections stay open, nothing answers).
    pub fn stop(&self) {
        signal(self.child.as_ref(), "-STOP");
    }

    /// SIGCONT: the hung Redis answers again.
    pub fn resume(&self) {
        signal(self.child.as_ref(), "-CONT");
    }

    /// Kill -9: the hard way Redis goes away in production.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnedRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
