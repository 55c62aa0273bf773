//! What the groups measure with: CPU time per event of this process and of
//! the broker and Redis processes (`/proc`), and their process ids.

/// CPU spent per event, in core-µs: this process (every thread, librdkafka's
/// included), the broker, redis-server.
#[derive(Clone, Copy, Default, Debug)]
pub(super) struct CpuPerEvent {
    pub(super) bench: f64,
    pub(super) broker: Option<f64>,
    pub(super) redis: Option<f64>,
}

impl std::fmt::Display for CpuPerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.2}"));
        write!(f, "{:.2}+{}+{}", self.bench, opt(self.broker), opt(self.redis))
    }
}

impl CpuPerEvent {
    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::json!({"bench": self.bench, "broker": self.broker, "redis": self.redis})
    }
}

/// The broker's and redis-server's process ids, found by the port they
/// listen on (when they run on this machine).
pub(super) struct Pids {
    pub(super) broker: Option<u32>,
    pub(super) redis: Option<u32>,
}

impl Pids {
    pub(super) fn find(brokers: &str, redis_url: &str) -> Self {
        let port = |s: &str| s.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse::<u16>().ok());
        let first_broker = brokers.split(',').next().unwrap_or_default();
        let pids = Self {
            broker: port(first_broker).and_then(pid_listening_on),
            redis: port(redis_url).and_then(pid_listening_on),
        };
        println!("  CPU accounting: broker pid {:?}, redis-server pid {:?}", pids.broker, pids.redis);
        pids
    }
}

/// CPU ticks (user + system) of this process and the services, now.
pub(super) struct CpuSnap {
    pub(super) bench: u64,
    pub(super) broker: Option<u64>,
    pub(super) redis: Option<u64>,
}

impl CpuSnap {
    pub(super) fn take(pids: &Pids) -> Self {
        Self {
            bench: proc_ticks("self").unwrap_or(0),
            broker: pids.broker.and_then(|p| proc_ticks(&p.to_string())),
            redis: pids.redis.and_then(|p| proc_ticks(&p.to_string())),
        }
    }

    pub(super) fn per_event_since(&self, before: &CpuSnap, events: usize) -> CpuPerEvent {
        let us = |now: u64, then: u64| (now.saturating_sub(then)) as f64 * 1e6 / clock_ticks() / events.max(1) as f64;
        CpuPerEvent {
            bench: us(self.bench, before.bench),
            broker: self.broker.zip(before.broker).map(|(n, t)| us(n, t)),
            redis: self.redis.zip(before.redis).map(|(n, t)| us(n, t)),
        }
    }
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of
/// /proc/PID/stat, counted after the command name's closing parenthesis).
pub(super) fn proc_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS of a process (`self` or a pid), in KiB; 0 when it cannot be read.
pub(super) fn rss_kib_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
pub(super) fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The process listening on a local TCP port: the socket's inode from
/// /proc/net/tcp{,6}, then the process holding it among /proc/*/fd.
pub(super) fn pid_listening_on(port: u16) -> Option<u32> {
    let hex = format!(":{port:04X}");
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|f| {
        std::fs::read_to_string(f).ok()?.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() > 9 && cols[1].ends_with(&hex) && cols[3] == "0A").then(|| cols[9].to_owned())
        })
    })?;
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|d| {
        let pid: u32 = d.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(d.path().join("fd")).ok()?;
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_str() == Some(target.as_str())))
            .then_some(pid)
    })
}

/// This binary again, as a process of its own with `var` = `spec` (a part
/// of a group: the gateway, or idle clients), its stdin and stdout piped;
/// killed when dropped. Its stdout's lines, apart.
pub(super) fn spawn_self(
    var: &str,
    spec: String,
    what: &str,
) -> (tokio::process::Child, tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("this binary"))
        .env(var, spec)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}
