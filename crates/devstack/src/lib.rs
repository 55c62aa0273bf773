//! Starts and stops the services dualstream runs on, for its tests, its
//! harness (demo, benchmarks, chaos) and `cargo xtask`: tansu
//! ([`OwnedBroker`], [`tansu::broker_command`]) with its PostgreSQL database
//! ([`tansu_pg`]), redis-server ([`OwnedRedis`], [`redis::server_command`]),
//! a gateway process ([`OwnedGateway`]), a 3-master Redis Cluster
//! (`cluster::RedisCluster`, feature `cluster`) and a TCP delay proxy
//! (`proxy::DelayProxy`, feature `proxy`).
//!
//! A server a fixture starts gets a loopback port reserved for the fixture's
//! whole life, restarts included, below the ephemeral range ([`PortHold`]),
//! and counts as up once it listens there itself, per `/proc` ([`ports`]);
//! if another process took the port first it starts on another.
//!
//! Without features the crate is std only: `cargo xtask` builds it so. The
//! feature `clients` adds clients for the services ([`clients`]: topic
//! creation, an independent Kafka read-back, a Redis subscriber).
//!
//! Not published, and no library crate depends on it (xtask's layering
//! test checks).

#[cfg(feature = "clients")]
pub mod clients;
#[cfg(feature = "cluster")]
pub mod cluster;
mod gateway;
mod owned;
pub mod ports;
#[cfg(feature = "proxy")]
pub mod proxy;
pub mod redis;
pub mod tansu;
pub mod tansu_pg;

pub use gateway::OwnedGateway;
pub use owned::{restart_on, start_on_own_port, PortHold};
pub use redis::OwnedRedis;
pub use tansu::{DurableEngine, OwnedBroker};

/// A name part no other fixture of any process uses: the process id, the
/// clock's nanoseconds and a counter (letters, digits and `_` only, so it
/// fits a database name).
pub(crate) fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}_{nanos}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::time::Duration;

    use crate::owned::start_on_own_port;
    use crate::{ports, OwnedRedis, PortHold};

    #[test]
    fn a_listening_socket_is_seen_with_its_owner() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(ports::listens(std::process::id(), port), "this process listens on {port}");
        drop(listener);
        assert!(!ports::listens(std::process::id(), port), "no longer after the drop");
    }

    /// Another process takes the port between the reservation and the
    /// server's bind: the server exits (address in use), and the fixture
    /// starts it on another port instead of taking the other process, which
    /// answers on the port, for its own server.
    #[test]
    fn a_server_that_cannot_listen_on_its_port_is_started_on_another() {
        let thief = std::sync::Mutex::new(None::<TcpListener>);
        let (hold, mut child) = start_on_own_port("test redis", Duration::from_secs(10), |port| {
            let mut thief = thief.lock().expect("lock");
            if thief.is_none() {
                *thief = Some(TcpListener::bind(("127.0.0.1", port)).expect("take the port first"));
            }
            crate::redis::server_command(port).stdout(std::process::Stdio::null()).spawn().expect("redis-server")
        });
        let stolen = thief.lock().expect("lock").as_ref().and_then(|l| l.local_addr().ok()).expect("taken").port();
        assert_ne!(hold.port, stolen, "started on another port");
        assert!(ports::listens(child.id(), hold.port), "the server itself listens");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// While a fixture lives, its port stays reserved (no other fixture can
    /// reserve it), across a kill, and the server comes back on it.
    #[test]
    fn a_fixture_keeps_its_port_reserved_across_a_restart() {
        let mut redis = OwnedRedis::start();
        let port = redis.port;
        assert!(TcpListener::bind(("127.0.0.2", port)).is_err(), "reserved while up");
        redis.kill();
        assert!(TcpListener::bind(("127.0.0.2", port)).is_err(), "reserved while down");
        assert!((0..50).all(|_| PortHold::new().port != port), "never handed to another fixture");
        redis.restart();
        assert_eq!(redis.port, port);
        assert!(ports::listens(redis.pid().expect("running"), port));
        drop(redis);
        // Other fixtures (tests beside this one, a chaos run) reserve ports
        // too and may take this one the moment it is free: a hold that
        // comes and goes is theirs, one that never goes would be ours.
        let released = (0..100).any(|_| {
            TcpListener::bind(("127.0.0.2", port)).is_ok() || {
                std::thread::sleep(Duration::from_millis(20));
                false
            }
        });
        assert!(released, "released on drop");
    }
}
