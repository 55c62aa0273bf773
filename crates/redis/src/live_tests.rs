//! The notifier against a redis-server of each test's own, and against a
//! server that accepts connections and never answers (a hung Redis).
//!
//! Each server listens on a Unix socket in a directory of its own (no TCP
//! port: nothing to collide with the shared Redis on 6379 or with other
//! tests' servers). `redis-server` must be on `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, aio::MultiplexedConnection};
use dualstream_core::{Event, Notification, NotifyError, Position, RealtimeNotifier};
use futures::StreamExt;

use crate::{BreakerConfig, BreakerState, RedisNotifier, RedisNotifierConfig};

/// A directory of the test's own, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ds-redis-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Self(dir)
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn url(socket: &Path) -> String {
    format!("redis+unix://{}", socket.display())
}

/// A redis-server on a Unix socket, killed on drop.
struct OwnRedis {
    child: Child,
    socket: PathBuf,
    _dir: Dir,
}

impl OwnRedis {
    fn start() -> Self {
        let dir = Dir::new();
        let socket = dir.socket("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no", "--unixsocketperm", "700"])
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(&dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        let until = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < until, "redis-server listens on {} within 10 s", socket.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, socket, _dir: dir }
    }

    fn url(&self) -> String {
        url(&self.socket)
    }

    /// A connection of the test's own, for commands to the server.
    async fn admin(&self) -> MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("client");
        client.get_multiplexed_async_connection().await.expect("admin connection")
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connections the server accepted since it started.
async fn connections_received(admin: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("stats").query_async(admin).await.expect("INFO stats");
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_connections_received in INFO stats")
}

/// Hold every client's writes, PUBLISH included (CLIENT PAUSE WRITE), until
/// [`unpause`].
async fn pause(admin: &mut MultiplexedConnection) {
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(60_000).arg("WRITE").query_async(admin).await.expect("pause");
}

async fn unpause(admin: &mut MultiplexedConnection) {
    let _: () = redis::cmd("CLIENT").arg("UNPAUSE").query_async(admin).await.expect("unpause");
}

/// The id of the one client whose last command was `cmd`.
async fn client_with_last_command(admin: &mut MultiplexedConnection, cmd: &str) -> u64 {
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(admin).await.expect("CLIENT LIST");
    let ids: Vec<u64> = list
        .lines()
        .filter(|l| l.split(' ').any(|f| f == format!("cmd={cmd}")))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id="))?.parse().ok())
        .collect();
    assert_eq!(ids.len(), 1, "one client whose last command was {cmd}: {list}");
    ids[0]
}

/// A server that accepts every connection and never answers: a hung Redis
/// (or a stalled network path) as a client sees it.
async fn silent_server(dir: &Dir) -> String {
    let socket = dir.socket("hung.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    url(&socket)
}

fn notification(source: &str, n: i64) -> Notification {
    let event = Event::builder("customer.updated", "customer", source).build().expect("valid event");
    Notification::for_event(&event, Some(Position::new("events", 0, n)))
}

fn notifier(url: String, failure_threshold: u32) -> RedisNotifier {
    RedisNotifier::new(RedisNotifierConfig {
        url,
        timeout_ms: 5_000,
        breaker: BreakerConfig { failure_threshold, open_min_ms: 20, open_max_ms: 20 },
        ..RedisNotifierConfig::default()
    })
    .expect("notifier")
}

/// A redis-server of the test's own, a connection for the test's commands,
/// and a notifier whose breaker opens after `failure_threshold` failures.
async fn own_redis(failure_threshold: u32) -> (OwnRedis, MultiplexedConnection, RedisNotifier) {
    let redis = OwnRedis::start();
    let admin = redis.admin().await;
    let notifier = notifier(redis.url(), failure_threshold);
    (redis, admin, notifier)
}

/// Notify until a call succeeds (the breaker's probe, once it is due).
async fn until_delivered(notifier: &RedisNotifier, n: &Notification) {
    let until = Instant::now() + Duration::from_secs(10);
    while notifier.notify(n).await.is_err() {
        assert!(Instant::now() < until, "a call succeeds within 10 s: {:?}", notifier.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// With the defaults, the publisher stops waiting for a notifier call after
/// `notify_timeout_ms` (250 ms), before a connection attempt to a hung
/// Redis ends (`connect_timeout_ms`, 1 s). Each call given up on still
/// counts toward the breaker, so three of them open it, as three failures
/// do; nothing was sent, so they are failed, not timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_given_up_on_during_a_hung_reconnect_open_the_breaker() {
    let dir = Dir::new();
    let notifier = RedisNotifier::new(RedisNotifierConfig { url: silent_server(&dir).await, ..Default::default() })
        .expect("notifier");
    let n = notification("c1", 0);
    for _ in 0..3 {
        // The publisher's bound (PublisherConfig's default notify_timeout_ms).
        // On a slow machine the attempt's own bound may end a call first:
        // a failure either way.
        let call = tokio::time::timeout(Duration::from_millis(250), notifier.notify(&n)).await;
        assert!(!matches!(call, Ok(Ok(()))), "nothing answers");
    }
    let stats = notifier.stats();
    assert_eq!(stats.breaker, BreakerState::Open, "{stats:?}");
    assert_eq!((stats.failed, stats.timed_out, stats.published), (3, 0, 0), "{stats:?}");
    assert!(matches!(notifier.notify(&n).await, Err(NotifyError::CircuitOpen)), "skipped at once now");
}

/// A call whose caller gives up while it waits for the connection being
/// made counts toward the breaker, and does not drop the connection that
/// was made meanwhile (for another call): the probe goes out on it.
#[tokio::test]
async fn a_call_given_up_while_connecting_counts_and_keeps_the_connection_made_meanwhile() {
    let (_redis, mut admin, notifier) = own_redis(1).await;
    let n = notification("c1", 0);
    let mut waiting = notifier.notify(&n);
    assert!(futures::poll!(&mut waiting).is_pending(), "waits for the connection being made");
    notifier.health_check().await.expect("the connection is made meanwhile");
    let made = connections_received(&mut admin).await;
    drop(waiting);
    let stats = notifier.stats();
    assert_eq!((stats.failed, stats.timed_out, stats.published), (1, 0, 0), "nothing was sent: {stats:?}");
    assert_eq!(stats.breaker, BreakerState::Open, "counted by the breaker (threshold 1)");
    until_delivered(&notifier, &n).await;
    assert_eq!(connections_received(&mut admin).await, made, "the probe used the connection made meanwhile");
}

/// A call that fails on a connection drops that connection only: when
/// another call has made a new one since, the new one stays.
#[tokio::test]
async fn a_failed_call_drops_its_own_connection_not_one_made_since() {
    let (_redis, mut admin, notifier) = own_redis(1_000).await;
    let n = notification("c1", 0);
    notifier.notify(&n).await.expect("connection X");
    let x = client_with_last_command(&mut admin, "publish").await;
    // Held (CLIENT PAUSE WRITE holds every PUBLISH) until X is killed: its
    // answer never comes.
    pause(&mut admin).await;
    let mut on_x = notifier.notify(&n);
    assert!(futures::poll!(&mut on_x).is_pending(), "sent on X, waiting for the answer");
    let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("ID").arg(x).query_async(&mut admin).await.expect("kill");
    assert_eq!(killed, 1);
    unpause(&mut admin).await;
    // The next calls find X broken, drop it and make connection Y.
    until_delivered(&notifier, &n).await;
    let made = connections_received(&mut admin).await;
    let late = on_x.await;
    assert!(matches!(late, Err(NotifyError::Connection(_))), "the answer went with X: {late:?}");
    notifier.notify(&n).await.expect("delivered");
    assert_eq!(connections_received(&mut admin).await, made, "Y was kept");
}

/// Redis paused (CLIENT PAUSE WRITE holds every PUBLISH) past the call's
/// bound: the call ends with `Timeout` at its own bound (700 ms, above
/// redis-rs's default response timeout of 500 ms, which must not cut it as
/// an error), and is counted as timed out, not failed. Redis delivers the
/// notification once it resumes.
#[tokio::test]
async fn a_timeout_is_outcome_unknown_and_redis_may_deliver_it() {
    let redis = OwnRedis::start();
    let mut admin = redis.admin().await;
    let notifier = RedisNotifier::new(RedisNotifierConfig {
        url: redis.url(),
        timeout_ms: 700,
        timeout_per_notification_us: 0,
        ..RedisNotifierConfig::default()
    })
    .expect("notifier");
    let n = notification("c1", 1);
    let channel = notifier.namer().channel("customer", "c1").expect("channel");
    let client = redis::Client::open(redis.url()).expect("client");
    let mut subscriber = client.get_async_pubsub().await.expect("subscriber");
    subscriber.subscribe(&channel).await.expect("subscribed");
    notifier.notify(&notification("c1", 0)).await.expect("connected");

    pause(&mut admin).await;
    let r = notifier.notify(&n).await;
    assert!(matches!(r, Err(NotifyError::Timeout { after }) if after == Duration::from_millis(700)), "{r:?}");
    unpause(&mut admin).await;

    let mut messages = subscriber.on_message();
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(5), messages.next()).await.expect("a message").expect("open");
        got.push(Notification::from_json(m.get_payload_bytes()).expect("notification JSON"));
    }
    assert_eq!(got[1], n, "Redis delivered the notification the call timed out on");
    let stats = notifier.stats();
    assert_eq!((stats.published, stats.failed, stats.timed_out), (1, 0, 1), "{stats:?}");
    assert_eq!(stats.breaker, BreakerState::Closed, "one timeout of three");
}

/// A call given up on after it was sent counts toward the breaker when
/// Redis answered nothing meanwhile (so a hung Redis opens it), and not
/// when Redis answered another call while it waited (Redis is up; the call
/// waited behind work). Either way it is counted as timed out.
#[tokio::test]
async fn a_timeout_counts_toward_the_breaker_unless_redis_answered_meanwhile() {
    let (_redis, _admin, notifier) = own_redis(1).await;
    notifier.notify(&notification("c1", 0)).await.expect("connected");

    let (n1, n3) = (notification("c1", 1), notification("c1", 3));
    let mut slow = notifier.notify(&n1);
    assert!(futures::poll!(&mut slow).is_pending(), "sent, waiting for the answer");
    notifier.notify(&notification("c1", 2)).await.expect("Redis answers another call meanwhile");
    drop(slow);
    let stats = notifier.stats();
    assert_eq!((stats.published, stats.failed, stats.timed_out), (2, 0, 1), "{stats:?}");
    assert_eq!(stats.breaker, BreakerState::Closed, "Redis answered meanwhile: not counted");

    let mut unanswered = notifier.notify(&n3);
    assert!(futures::poll!(&mut unanswered).is_pending(), "sent, waiting for the answer");
    drop(unanswered);
    let stats = notifier.stats();
    assert_eq!((stats.published, stats.failed, stats.timed_out), (2, 0, 2), "{stats:?}");
    assert_eq!(stats.breaker, BreakerState::Open, "no answer meanwhile: counted (threshold 1)");
}
