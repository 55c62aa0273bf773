//! A Redis Cluster of three masters on loopback, owned by one test (feature
//! `cluster`): each node a `redis-server --cluster-enabled yes` on a port
//! reserved for it (and a second reserved port for its cluster bus, given
//! with `--cluster-port`, so the bus never lands on `port + 10000`, which
//! may be in the ephemeral range), joined with `redis-cli --cluster create`. Nodes can be killed and
//! restarted; everything is stopped, and the node files removed, on drop.
//!
//! The nodes run with `--cluster-require-full-coverage no`, so the other two
//! masters keep serving their slots while one is down, as a production
//! cluster with replicas would keep serving through a failover.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deadpool_redis::redis;

use crate::{restart_on, start_on_own_port, PortHold};

/// Bound on a node listening after a start, and on the cluster becoming
/// healthy after `cluster create` or a restart.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on `redis-cli --cluster create`.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one command sent to a node by the fixture.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// One master of a [`RedisCluster`].
#[derive(Debug)]
struct Node {
    port: u16,
    bus: PortHold,
    child: Option<Child>,
    _hold: PortHold,
}

/// A 3-master Redis Cluster owned by one test (see the module docs).
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

fn spawn_node(dir: &std::path::Path, port: u16, bus: u16) -> Child {
    crate::redis::cluster_node_command(port, bus, dir)
        .args(["--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("redis-server on PATH ({}): {e}", crate::redis::INSTALL_HINT))
}

/// Run `cmd`, killing it after `timeout`; its stdout, or why it failed.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<String, String> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    let until = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= until => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not finish within {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.to_string()),
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{}: {stdout} {}", out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

/// Send one command to the node on `port`, bounded by `COMMAND_TIMEOUT`.
fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
    conn.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    conn.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    cmd.query(&mut conn)
}

fn unique_dir() -> PathBuf {
    std::env::temp_dir().join(format!("dualstream-cluster-{}", crate::unique_suffix()))
}

impl RedisCluster {
    /// Start three nodes, join them into one cluster (slots split evenly,
    /// no replicas) and wait until every node sees all three masters
    /// connected and every slot served.
    pub fn start() -> Self {
        let dir = unique_dir();
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let mut cluster = Self { nodes: Vec::new(), dir };
        for _ in 0..3 {
            let bus = PortHold::new();
            let bus_port = bus.port;
            let dir = cluster.dir.clone();
            let (hold, child) =
                start_on_own_port("cluster redis", START_TIMEOUT, |port| spawn_node(&dir, port, bus_port));
            cluster.nodes.push(Node { port: hold.port, bus, child: Some(child), _hold: hold });
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        if let Err(e) = run_bounded(create, CREATE_TIMEOUT) {
            panic!("redis-cli --cluster create on {:?}: {e}", cluster.ports());
        }
        cluster.wait_healthy();
        cluster
    }

    /// The nodes' client ports, in start order (node `i` is `ports()[i]`).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:<port>` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect()
    }

    /// The hash slot of `key` (or of a channel), as the cluster computes it.
    pub fn slot(&self, key: &str) -> u16 {
        let port = self.running_port();
        query(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).expect("CLUSTER KEYSLOT")
    }

    /// The client port of the master that serves `slot`, as a running node
    /// sees it.
    pub fn owner_of_slot(&self, slot: u16) -> u16 {
        let port = self.running_port();
        self.owner_seen_by(port, slot).unwrap_or_else(|| panic!("no node serves slot {slot} for node {port}"))
    }

    /// The client port of the master that serves `slot` as node `port`
    /// sees it (`CLUSTER NODES`).
    fn owner_seen_by(&self, port: u16, slot: u16) -> Option<u16> {
        let text: String = query(port, redis::cmd("CLUSTER").arg("NODES")).expect("CLUSTER NODES");
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // id addr flags master ping pong epoch link slot...
            let Some(addr) = fields.get(1) else { continue };
            for range in fields.iter().skip(8).filter(|f| !f.starts_with('[')) {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>()) {
                    if (lo..=hi).contains(&slot) {
                        let host_port = addr.split('@').next().unwrap_or(addr);
                        return host_port.rsplit(':').next().and_then(|p| p.parse().ok());
                    }
                }
            }
        }
        None
    }

    /// The client port of the master that serves `key` (or a channel).
    pub fn owner_of(&self, key: &str) -> u16 {
        self.owner_of_slot(self.slot(key))
    }

    /// An independent sharded subscriber to `channels`: on each channel's
    /// owner now, see [`ShardWitness`].
    pub fn witness(&self, channels: &[String]) -> ShardWitness {
        let mut by_owner: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for c in channels {
            by_owner.entry(self.owner_of(c)).or_default().push(c.clone());
        }
        ShardWitness::new(&by_owner)
    }

    /// Move every slot of node `from` to node `to` with `redis-cli --cluster
    /// reshard`, the way an operator does, and wait until every node sees
    /// the new owner of `slot` (one of the moved slots).
    pub fn reshard_all(&self, from: u16, to: u16, slot: u16) {
        let id = |port: u16| -> String { query(port, redis::cmd("CLUSTER").arg("MYID")).expect("CLUSTER MYID") };
        let (from_id, to_id) = (id(from), id(to));
        let nodes: String = query(from, redis::cmd("CLUSTER").arg("NODES")).expect("CLUSTER NODES");
        let mine = nodes.lines().find(|l| l.contains("myself")).expect("the node itself");
        let count: u32 = mine
            .split_whitespace()
            .skip(8)
            .filter(|r| !r.starts_with('['))
            .map(|r| match r.split_once('-') {
                Some((a, b)) => b.parse::<u32>().expect("slot") - a.parse::<u32>().expect("slot") + 1,
                None => 1,
            })
            .sum();
        let status = Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id, "--cluster-slots", &count.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success(), "redis-cli --cluster reshard of {count} slots from {from} to {to}: {status}");
        let until = Instant::now() + HEALTHY_TIMEOUT;
        while self.nodes.iter().filter(|n| n.child.is_some()).any(|n| self.owner_seen_by(n.port, slot) != Some(to)) {
            assert!(Instant::now() < until, "slot {slot} not on {to} everywhere within {HEALTHY_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Move `slot` (with no keys in it) to the node on `to` (a client
    /// port), as `redis-cli --cluster reshard` does for each slot:
    /// `IMPORTING` on the target, `MIGRATING` on the source, then `NODE` on
    /// every node; returns once every running node names the target as
    /// the slot's owner.
    pub fn move_slot(&self, slot: u16, to: u16) {
        let from = self.owner_of_slot(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let id = |port: u16| -> String { query(port, redis::cmd("CLUSTER").arg("MYID")).expect("CLUSTER MYID") };
        let (from_id, to_id) = (id(from), id(to));
        let setslot = |port: u16, args: &[&str]| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(args);
            query::<()>(port, &cmd).unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {args:?} on {port}: {e}"));
        };
        setslot(to, &["IMPORTING", &from_id]);
        setslot(from, &["MIGRATING", &to_id]);
        setslot(to, &["NODE", &to_id]);
        setslot(from, &["NODE", &to_id]);
        for n in self.nodes.iter().filter(|n| n.child.is_some() && n.port != from && n.port != to) {
            setslot(n.port, &["NODE", &to_id]);
        }
        let until = Instant::now() + HEALTHY_TIMEOUT;
        while self.nodes.iter().filter(|n| n.child.is_some()).any(|n| self.owner_seen_by(n.port, slot) != Some(to)) {
            assert!(Instant::now() < until, "slot {slot} not on {to} everywhere within {HEALTHY_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Send `cmd` to the node on `port`, bounded by 5 s (`CLIENT LIST`, an
    /// `SPUBLISH` straight to a node, and the like).
    pub fn query<T: redis::FromRedisValue>(&self, port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        query(port, cmd)
    }

    /// Make the node on `port` announce `announced` as its client port
    /// (`CONFIG SET cluster-announce-port`), as a node behind a proxy or a
    /// NAT does: a client that reads the slot map from this node connects
    /// to `announced` for its slots (the other nodes learn it by gossip,
    /// later). Returns once the node's own `CLUSTER SLOTS` names it.
    pub fn announce_port(&self, port: u16, announced: u16) {
        let mut set = redis::cmd("CONFIG");
        set.arg("SET").arg("cluster-announce-port").arg(announced);
        query::<()>(port, &set).unwrap_or_else(|e| panic!("CONFIG SET cluster-announce-port on {port}: {e}"));
        // [[first, last, [host, port, id, ..], ..], ..]
        let names_it = |v: &redis::Value| {
            let redis::Value::Array(ranges) = v else { return false };
            let port = redis::Value::Int(i64::from(announced));
            ranges.iter().any(|r| match r {
                redis::Value::Array(fields) => {
                    matches!(fields.get(2), Some(redis::Value::Array(m)) if m.get(1) == Some(&port))
                }
                _ => false,
            })
        };
        let until = Instant::now() + HEALTHY_TIMEOUT;
        loop {
            let slots: redis::Value = query(port, redis::cmd("CLUSTER").arg("SLOTS")).expect("CLUSTER SLOTS");
            if names_it(&slots) {
                return;
            }
            assert!(Instant::now() < until, "node {port} does not announce {announced} within {HEALTHY_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill -9 node `i` (its slots are not served until it restarts).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start node `i` again on its ports, with its node file (same id,
    /// same slots), and wait until the cluster is healthy again.
    pub fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "node {i} is running");
        let child = spawn_node(&self.dir, node.port, node.bus.port);
        node.child = Some(restart_on("cluster redis", node.port, START_TIMEOUT, child));
        self.wait_healthy();
    }

    fn running_port(&self) -> u16 {
        self.nodes.iter().find(|n| n.child.is_some()).expect("a running node").port
    }

    /// Why the cluster is not healthy as node `port` sees it, if it is not:
    /// every node up and connected, none flagged failing, all slots served.
    fn unhealthy(&self, port: u16) -> Option<String> {
        let info: String = match query(port, redis::cmd("CLUSTER").arg("INFO")) {
            Ok(i) => i,
            Err(e) => return Some(format!("CLUSTER INFO: {e}")),
        };
        for want in ["cluster_state:ok", "cluster_slots_ok:16384", "cluster_known_nodes:3"] {
            if !info.lines().any(|l| l.trim() == want) {
                return Some(format!("no {want}"));
            }
        }
        let nodes: String = match query(port, redis::cmd("CLUSTER").arg("NODES")) {
            Ok(n) => n,
            Err(e) => return Some(format!("CLUSTER NODES: {e}")),
        };
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2).copied().unwrap_or("");
            if flags.split(',').any(|f| f == "fail" || f == "fail?" || f == "handshake" || f == "noaddr") {
                return Some(format!("flagged: {line}"));
            }
            if fields.get(7) != Some(&"connected") {
                return Some(format!("not connected: {line}"));
            }
        }
        None
    }

    /// Wait until every running node sees a healthy cluster.
    fn wait_healthy(&self) {
        let until = Instant::now() + HEALTHY_TIMEOUT;
        loop {
            let why = self
                .nodes
                .iter()
                .filter(|n| n.child.is_some())
                .find_map(|n| self.unhealthy(n.port).map(|w| format!("node {}: {w}", n.port)));
            let Some(why) = why else { return };
            let ports = self.ports();
            assert!(Instant::now() < until, "redis cluster {ports:?} not healthy within {HEALTHY_TIMEOUT:?}: {why}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An independent sharded Pub/Sub subscriber, sharing no code with
/// dualstream or redis-rs's connections: per node a plain TCP connection,
/// one `SSUBSCRIBE` per channel (Redis refuses one across slots), RESP
/// read with redis-rs's parser in a thread of its own. Messages of all
/// nodes arrive on one queue, each node's in the order the node sent them.
#[derive(Debug)]
pub struct ShardWitness {
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    streams: Vec<TcpStream>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn bulk(v: &redis::Value) -> Option<&[u8]> {
    match v {
        redis::Value::BulkString(b) => Some(b),
        _ => None,
    }
}

impl ShardWitness {
    /// Subscribe on each node (by client port) to its channels; returns
    /// once every node confirmed every subscription.
    pub fn new(by_owner: &BTreeMap<u16, Vec<String>>) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut witness = Self { rx, streams: Vec::new(), threads: Vec::new() };
        for (&port, channels) in by_owner {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to a cluster node");
            stream.set_read_timeout(Some(COMMAND_TIMEOUT)).expect("read timeout");
            let mut parser = redis::Parser::new();
            for c in channels {
                stream.write_all(&redis::cmd("SSUBSCRIBE").arg(c).get_packed_command()).expect("send SSUBSCRIBE");
            }
            for c in channels {
                let reply = parser.parse_value(&mut stream).unwrap_or_else(|e| panic!("SSUBSCRIBE {c} on {port}: {e}"));
                let redis::Value::Array(items) = &reply else { panic!("SSUBSCRIBE {c} on {port}: {reply:?}") };
                let kind = items.first().and_then(bulk);
                assert_eq!(kind, Some(&b"ssubscribe"[..]), "SSUBSCRIBE {c} on {port}: {reply:?}");
            }
            stream.set_read_timeout(None).expect("no read timeout");
            witness.streams.push(stream.try_clone().expect("clone stream"));
            let tx = tx.clone();
            witness.threads.push(std::thread::spawn(move || loop {
                // Ends when the witness shuts the stream down (or the node goes away).
                let Ok(redis::Value::Array(items)) = parser.parse_value(&mut stream) else { return };
                if let [kind, channel, payload] = items.as_slice() {
                    if let (Some(b"smessage"), Some(ch), Some(p)) = (bulk(kind), bulk(channel), bulk(payload)) {
                        if tx.send((String::from_utf8_lossy(ch).into_owned(), p.to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }));
        }
        witness
    }

    /// The next message, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        tokio::time::timeout(timeout, self.rx.recv()).await.ok().flatten()
    }
}

impl Drop for ShardWitness {
    fn drop(&mut self) {
        for s in &self.streams {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
