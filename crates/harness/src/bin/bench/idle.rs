//! The `gateway` group's idle rows: what N idle SSE connections, one channel
//! each, cost the gateway in memory and descriptors. A child process (this
//! binary again, with [`CHILD_ENV`] set) opens and holds the connections, so
//! this process holds only the gateway's side of each socket and its RSS
//! growth is the gateway's.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::gateway::{start, urlenc, Tweak, PARTITIONS};
use super::Row;
use dualstream_devstack::clients::*;

/// Set in the child: `<host:port> <connections> <token> <channel prefix>`.
pub(super) const CHILD_ENV: &str = "DUALSTREAM_BENCH_IDLE_CHILD";

/// Connections the child opens at once.
const CONNECTING: usize = 200;

/// The child: open the connections, each an SSE stream of its own channel,
/// print `ready <subscribed> <failed>` once every one has its `subscribed`
/// item or failed, then hold them until stdin closes.
pub(super) async fn child(spec: &str) {
    let parts: Vec<&str> = spec.split(' ').collect();
    let [addr, n, token, prefix] = parts[..] else { panic!("{CHILD_ENV}={spec:?}: want 4 fields") };
    let n: usize = n.parse().expect("connections");
    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECTING));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (gate, addr, token) = (Arc::clone(&gate), addr.to_owned(), token.to_owned());
            let channel = format!("{prefix}:user:idle{i}");
            tokio::spawn(async move {
                let _slot = gate.acquire_owned().await.expect("gate");
                tokio::time::timeout(Duration::from_secs(60), subscribe(&addr, &token, &channel)).await
            })
        })
        .collect();
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(Ok(s))) => held.push(s),
            Ok(Ok(Err(e))) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Ok(Err(_)) => {
                failed += 1;
                first_error.get_or_insert("no subscribed item within 60 s".to_owned());
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    println!("ready {} {failed} {}", held.len(), first_error.unwrap_or_default());
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    drop(held);
}

/// One SSE stream, up to its `subscribed` item; nothing is read after it.
async fn subscribe(addr: &str, token: &str, channel: &str) -> Result<tokio::net::TcpStream, String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "GET /v1/stream?channel={} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\naccept: text/event-stream\r\n\r\n",
        urlenc(channel)
    );
    s.write_all(request.as_bytes()).await.map_err(|e| format!("request: {e}"))?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let k = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if k == 0 {
            return Err(format!("closed before subscribed: {}", String::from_utf8_lossy(&seen)));
        }
        seen.extend_from_slice(&buf[..k]);
        let text = String::from_utf8_lossy(&seen);
        if text.contains("event: subscribed") {
            return Ok(s);
        }
        if !text.starts_with("HTTP/1.1 200") && text.contains("\r\n\r\n") {
            return Err(text.lines().next().unwrap_or_default().to_owned());
        }
    }
}

/// Anonymous memory of process `pid` in transparent huge pages, in KiB.
fn huge_pages_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("AnonHugePages:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The rows: RSS and descriptors of the gateway's process with `n` idle
/// connections against none.
pub(super) async fn idle_rows(brokers: &str, redis_url: &str, n: usize, rows: &mut Vec<Row>) {
    let topic = unique_topic("bench-gw-idle");
    create_topic(brokers, &topic, PARTITIONS).await;
    let room = n + 1_000;
    let setup = start(brokers, redis_url, &topic, Tweak::Room(room)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = setup.shared.gateway_pid;
    let (rss_before, fds_before, huge_before) = (setup.shared.gateway_rss(), open_descriptors(pid), huge_pages_kib(pid));
    let addr = setup.shared.base.trim_start_matches("http://").to_owned();
    let spec = format!("{addr} {n} {} {}", setup.shared.token, setup.shared.prefix);
    let (mut child, mut lines) = super::measure::spawn_self(CHILD_ENV, spec, "the idle clients' process");
    let started = std::time::Instant::now();
    let ready = tokio::time::timeout(Duration::from_secs(600), lines.next_line()).await;
    let line = match ready {
        Ok(Ok(Some(l))) => l,
        other => {
            println!("  idle connections: the child gave no answer ({other:?}); no row");
            return;
        }
    };
    let took = started.elapsed().as_secs_f64();
    let mut fields = line.splitn(4, ' ').skip(1);
    let subscribed: usize = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let failed: usize = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let error = fields.next().unwrap_or_default().to_owned();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_after, fds_after) = (setup.shared.gateway_rss(), open_descriptors(pid));
    let huge_mib = huge_pages_kib(pid).saturating_sub(huge_before) as f64 / 1024.0;
    let growth_mib = rss_after.saturating_sub(rss_before) as f64 / 1024.0;
    let per_kib = rss_after.saturating_sub(rss_before) as f64 / subscribed.max(1) as f64;
    println!(
        "  idle: {subscribed} of {n} SSE connections subscribed in {took:.1} s ({failed} failed{}); RSS {} → {} MiB ({per_kib:.1} KiB a connection; {huge_mib:.0} MiB more in huge pages); descriptors {fds_before} → {fds_after}",
        if error.is_empty() { String::new() } else { format!(": {error}") },
        rss_before >> 10,
        rss_after >> 10
    );
    let note = format!(
        "{subscribed} of {n} SSE connections subscribed ({failed} failed{}), each to a channel of its own, held open by a child process that reads nothing after its `subscribed` item; the gateway's process RSS {} → {} MiB ({per_kib:.1} KiB a connection; target ≤ 30 KiB), measured 2 s after the last subscribed, {huge_mib:.0} MiB more of the process in transparent huge pages (this binary's allocator, mimalloc, asks for them, and a huge page is resident whole: `MIMALLOC_ALLOW_THP=0` turns that off; the gateway's own binary uses the system allocator); connecting took {took:.1} s, {CONNECTING} at a time",
        if error.is_empty() { String::new() } else { format!(": {error}") },
        rss_before >> 10,
        rss_after >> 10
    );
    rows.push(Row {
        group: "gateway",
        name: format!("gateway: RSS growth with {n} idle SSE connections (one channel each), MiB"),
        ours: growth_mib,
        baseline: 300.0,
        unit: "MiB",
        goal: "≤ 300 MiB (ratio ≤ 1)".into(),
        met: Some(subscribed == n && growth_mib <= 300.0),
        cpu: None,
        note,
    });
    rows.push(Row {
        group: "gateway",
        name: format!("gateway: open descriptors added by {n} idle SSE connections"),
        ours: fds_after.saturating_sub(fds_before) as f64,
        baseline: f64::NAN,
        unit: "fds",
        goal: "one per connection".into(),
        met: Some(fds_after.saturating_sub(fds_before) <= n + 16),
        cpu: None,
        note: format!("{fds_before} → {fds_after} in the gateway's process"),
    });
    drop(child.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    setup.stop().await;
}
