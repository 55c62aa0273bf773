//! Whether a server process listens on a TCP port itself, from Linux's
//! `/proc`. The fixtures of this crate and `cargo xtask up` count a server
//! they start on a port they chose as up only once it holds the listening
//! socket: a connection that succeeds may reach another process that took
//! the port first, while ours failed to bind it.

use std::time::{Duration, Instant};

/// Whether process `pid` holds a TCP socket listening on `port` (IPv4 or
/// IPv6, any address).
pub fn listens(pid: u32, port: u16) -> bool {
    let listening = listening_inodes(port);
    !listening.is_empty() && socket_inodes(pid).iter().any(|inode| listening.contains(inode))
}

/// The inodes of the sockets listening on `port`.
fn listening_inodes(port: u16) -> Vec<u64> {
    let local = format!(":{port:04X}");
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st ... inode: state 0A is LISTEN.
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let (Some(addr), Some(&"0A"), Some(inode)) = (fields.get(1), fields.get(3), fields.get(9)) {
                if addr.ends_with(&local) {
                    out.extend(inode.parse::<u64>().ok());
                }
            }
        }
    }
    out
}

/// The inodes of the sockets among `pid`'s open files.
fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    fds.flatten()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.path()).ok()?;
            link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// How a server that was started on a port came up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Came {
    /// It listens on the port itself.
    Listening,
    /// It exited first (typically: the port was in use).
    Exited,
    /// Neither within the timeout.
    TimedOut,
}

/// Wait until process `pid` listens on `port`, or `exited()` says it is
/// gone, or `timeout` passed.
pub fn wait_listening(pid: u32, port: u16, timeout: Duration, mut exited: impl FnMut() -> bool) -> Came {
    let until = Instant::now() + timeout;
    loop {
        if listens(pid, port) {
            return Came::Listening;
        }
        if exited() {
            return Came::Exited;
        }
        if Instant::now() >= until {
            return Came::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
