//! Processes owned by one test or run: each server on a loopback port
//! reserved for it ([`PortHold`]) for the owner's whole life, restarts
//! included, up once it listens there itself ([`crate::ports`]).

use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::Duration;

use crate::ports;

/// A loopback port reserved for one fixture server for the fixture's whole
/// life, restarts included: a listener on `127.0.0.2` and the same port. The
/// server listens on `127.0.0.1`, which the reservation does not block, while
/// every other fixture, in this process or another, starts by reserving and
/// so skips the port; the kernel releases it when the process dies.
///
/// Ports are drawn from below the kernel's ephemeral range, so neither
/// `bind(0)` nor an outgoing connection's local port can land on one while
/// its server is down between a kill and a restart.
#[derive(Debug)]
pub struct PortHold {
    pub port: u16,
    _hold: TcpListener,
}

impl Default for PortHold {
    fn default() -> Self {
        Self::new()
    }
}

impl PortHold {
    pub fn new() -> Self {
        let range = fixture_ports();
        let seed = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), std::process::id());
        let span = u64::from(range.end - range.start);
        for i in 0..span {
            let port = range.start + ((seed.wrapping_add(i * 7_919)) % span) as u16;
            // Skip a port someone already listens on, and take the reservation.
            if TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            if let Ok(hold) = TcpListener::bind(("127.0.0.2", port)) {
                return Self { port, _hold: hold };
            }
        }
        panic!("no free port in {range:?} for a test server")
    }
}

/// Where fixture ports come from: below the ephemeral range (usually
/// 10000..32768), or above it if it starts too low.
fn fixture_ports() -> std::ops::Range<u16> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = text.split_whitespace().filter_map(|v| v.parse::<u16>().ok());
    let (low, high) = (bounds.next().unwrap_or(32_768), bounds.next().unwrap_or(60_999));
    if low > 11_000 {
        10_000..low
    } else {
        high.saturating_add(1).min(64_000)..u16::MAX
    }
}

/// How often a fixture server is started on another port after it could
/// not listen on the one it was given.
const START_ATTEMPTS: usize = 5;

/// Start a server on a port reserved for it: `spawn(port)` starts the
/// process, which counts as up once it listens on the port itself. If it
/// exits first (a process outside the fixtures listens there) or never
/// listens, it is killed and another port is tried.
pub fn start_on_own_port(what: &str, timeout: Duration, spawn: impl Fn(u16) -> Child) -> (PortHold, Child) {
    let mut failures = Vec::new();
    for _ in 0..START_ATTEMPTS {
        let hold = PortHold::new();
        let mut child = spawn(hold.port);
        match until_listening(&mut child, hold.port, timeout) {
            Ok(()) => return (hold, child),
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                failures.push(format!("port {}: {why}", hold.port));
            }
        }
    }
    panic!("{what} did not start in {START_ATTEMPTS} attempts: {failures:?}")
}

/// Wait until `child` itself listens on `port`.
pub(crate) fn until_listening(child: &mut Child, port: u16, timeout: Duration) -> Result<(), String> {
    match ports::wait_listening(child.id(), port, timeout, || !matches!(child.try_wait(), Ok(None))) {
        ports::Came::Listening => Ok(()),
        ports::Came::Exited => Err("exited before listening (port in use?)".into()),
        ports::Came::TimedOut => Err(format!("did not listen within {timeout:?}")),
    }
}

/// Start `child` again on the port its fixture holds; panics if it cannot
/// listen there.
pub fn restart_on(what: &str, port: u16, timeout: Duration, mut child: Child) -> Child {
    if let Err(why) = until_listening(&mut child, port, timeout) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} could not listen on its port {port} again: {why} (it is reserved against other fixtures only)");
    }
    child
}

/// Send `sig` (`-STOP`, `-CONT`) to a running child process.
pub(crate) fn signal(child: Option<&Child>, sig: &str) {
    let pid = child.expect("running").id();
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success();
    assert!(ok, "kill {sig} {pid}");
}
