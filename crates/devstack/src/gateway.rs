//! [`OwnedGateway`]: a `dualstream-gateway` process of a run's own.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::owned::{restart_on, start_on_own_port, PortHold};

/// A `dualstream-gateway` process owned by one run (the chaos harness's),
/// on a port reserved for it until the fixture is dropped (see [`PortHold`]).
/// Its log goes to a file beside its configuration. Killed on drop.
#[derive(Debug)]
pub struct OwnedGateway {
    pub port: u16,
    bin: PathBuf,
    config: PathBuf,
    /// The gateway's stderr (appended across restarts).
    pub log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    _hold: PortHold,
}

fn spawn_gateway(
    bin: &std::path::Path,
    config: &std::path::Path,
    log: &std::path::Path,
    env: &[(String, String)],
    port: u16,
) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("the gateway's log file");
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(config).args(["--listen", &format!("127.0.0.1:{port}")]);
    // Explicit settings win over the harness's own environment (KAFKA_BROKERS, REDIS_URL...).
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (build it with cargo build -p dualstream-gateway)", bin.display()))
}

impl OwnedGateway {
    const START_TIMEOUT: Duration = Duration::from_secs(30);

    /// Start `bin` with this TOML configuration (its `listen` is set here)
    /// and these environment variables (`KAFKA_BROKERS`, `REDIS_URL`,
    /// `DUALSTREAM_GATEWAY_SECRET`, ...).
    pub fn start(bin: &std::path::Path, config_toml: &str, env: &[(&str, &str)]) -> Self {
        let stem = format!("dualstream-gateway-{}", crate::unique_suffix());
        let config = std::env::temp_dir().join(format!("{stem}.toml"));
        let log = std::env::temp_dir().join(format!("{stem}.log"));
        std::fs::write(&config, config_toml).expect("the gateway's configuration file");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let (hold, child) = start_on_own_port("test gateway", Self::START_TIMEOUT, |port| {
            spawn_gateway(bin, &config, &log, &env, port)
        });
        Self { port: hold.port, bin: bin.to_owned(), config, log, env, child: Some(child), _hold: hold }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kill -9: every connection drops without a close.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port; returns when it listens.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = spawn_gateway(&self.bin, &self.config, &self.log, &self.env, self.port);
        self.child = Some(restart_on("test gateway", self.port, Self::START_TIMEOUT, child));
    }
}

impl Drop for OwnedGateway {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config);
    }
}
