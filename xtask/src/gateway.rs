//! `cargo xtask gateway`: the gateway binary on the local stack, with its URLs, a sample token and
//! ready-to-paste curl commands.
//!
//! `--broker mock` (the default, as for the demo): Kafka is librdkafka's in-process mock cluster inside
//! the gateway process (its hidden `--mock-kafka`), Redis a redis-server this command starts (or
//! `REDIS_URL`); nothing to install. `--broker tansu`, or `KAFKA_BROKERS` set: the stack of `cargo xtask
//! up`, which stays up afterwards (`cargo xtask down` stops it).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dualstream_devstack::ports::{wait_listening, Came};
use dualstream_devstack::OwnedRedis;

use crate::Broker;

/// A secret for this run only: tokens printed by an earlier run stop working.
fn random_secret() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    let mut urandom = std::fs::File::open("/dev/urandom").map_err(|e| format!("/dev/urandom: {e}"))?;
    urandom.read_exact(&mut bytes).map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default();
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    target.join("debug").join("dualstream-gateway")
}

/// A token for 24 h from the gateway binary's `token` command.
fn mint(bin: &Path, secret: &str, claims: &[&str]) -> Result<String, String> {
    let out = Command::new(bin)
        .env("DUALSTREAM_GATEWAY_SECRET", secret)
        .arg("token")
        .args(claims)
        .args(["--ttl", "86400"])
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!("minting a token failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub(crate) fn run(listen: SocketAddr, broker: Broker) -> Result<(), String> {
    crate::run(crate::cargo().args(["build", "--quiet", "-p", "dualstream-gateway", "--bin", "dualstream-gateway"]))?;
    let bin = binary();
    let secret = random_secret()?;
    let mut gateway = Command::new(&bin);
    gateway.env("DUALSTREAM_GATEWAY_SECRET", &secret).env("DUALSTREAM_GATEWAY_LISTEN", listen.to_string());
    let mut _redis = None;
    let kafka = if broker == Broker::Mock && std::env::var_os("KAFKA_BROKERS").is_none() {
        let url = match std::env::var("REDIS_URL") {
            Ok(url) => url,
            Err(_) => {
                // Ours: it gets the terminal's Ctrl-C as the gateway does, and is killed when the gateway exits.
                crate::stack::which("redis-server").ok_or(format!(
                    "redis-server not found: install it ({}) or set REDIS_URL",
                    dualstream_devstack::redis::INSTALL_HINT
                ))?;
                let redis = OwnedRedis::start();
                let url = redis.url();
                _redis = Some(redis);
                url
            }
        };
        gateway.env("REDIS_URL", &url).arg("--mock-kafka");
        format!("librdkafka's in-process mock cluster (nothing durable; --broker tansu for a real broker); redis {url}")
    } else {
        let stack = crate::stack::up(None, false)?;
        stack.env(&mut gateway);
        format!("{}, redis {} (the stack stays up: `cargo xtask down` stops it)", stack.kafka_brokers, stack.redis_url)
    };
    let token = mint(&bin, &secret, &["--sub", "xtask", "--read", "events:*", "--publish", "*"])?;
    // The dashboard's feed needs the admin claim: its URL carries such a token in the fragment, which the
    // browser keeps to itself (the page trades it for a single-use ticket).
    let admin = mint(&bin, &secret, &["--sub", "xtask-dashboard", "--admin"])?;
    let mut child = gateway.arg("serve").spawn().map_err(|e| format!("{}: {e}", bin.display()))?;
    let pid = child.id();
    let came = wait_listening(pid, listen.port(), Duration::from_secs(60), || matches!(child.try_wait(), Ok(Some(_))));
    if came != Came::Listening {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("the gateway did not listen on {listen} ({came:?}); its log is above"));
    }
    let base = format!("http://{listen}");
    let event = r#"{"type":"order.created","source_type":"user","source_id":"alice","payload":{"total":42}}"#;
    let auth = format!("-H 'Authorization: Bearer {token}'");
    println!("\ndualstream gateway on {base}\n  kafka: {kafka}\n");
    println!("  dashboard  {base}/#token={admin}\n  ingest     POST {base}/v1/events");
    println!("  SSE        GET  {base}/v1/stream?pattern=events:*\n  WebSocket  ws://{listen}/v1/ws");
    println!("  readiness  {base}/readyz (the detail with the admin token)\n");
    println!("token (read events:*, publish *, 24 h; signed with this run's random secret):\n{token}\n");
    println!("ingest an event:\n  curl -sS {auth} -H 'content-type: application/json' \\");
    println!("    -d '{event}' {base}/v1/events");
    println!("watch the stream (in another terminal):\n  curl -sN {auth} '{base}/v1/stream?pattern=events:*'\n");
    println!("Ctrl-C stops the gateway.");
    let status = child.wait().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the gateway exited with {status}"))
    }
}
