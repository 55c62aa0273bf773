//! The `gateway` group (issue #13): a gateway in a process of its own (this
//! binary again, [`gateway_process`]; its runtime's threads `gw-rt`) serving
//! SSE and WebSocket clients of this process, each on a few of a set of
//! shared channels, while ingest posts events over HTTP. Then a
//! reconnect storm (every client drops and resumes with its last token), and
//! every client's sequence checked against a plain rdkafka consumer's reading
//! of the topic. Beside it, a naive gateway: one Redis Pub/Sub connection per
//! client, forwarded as SSE, with the same clients and load.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deadpool_redis::redis;
use dualstream_devstack::clients::*;
use dualstream_gateway::{AuthConfig, Gateway, GatewayConfig, ResumeToken};
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

mod neighbour;

use super::measure::rss_kib_of;
use super::measure::{clock_ticks, proc_ticks, CpuSnap, Pids};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use super::Row;

const SECRET: &str = "bench-secret-of-at-least-32-bytes-long";
pub(super) const PARTITIONS: i32 = 8;

/// A knob, from `DUALSTREAM_BENCH_GW_<NAME>` when set (to scale the group
/// down on a smaller machine), else `default`.
fn knob(name: &str, default: usize) -> usize {
    super::env_knob(&format!("DUALSTREAM_BENCH_GW_{name}")).unwrap_or(default)
}

#[derive(Clone, Copy)]
struct Knobs {
    /// Clients of each transport (SSE, WebSocket); the naive run has twice
    /// this many SSE clients.
    clients: usize,
    sources: usize,
    /// Events/s posted, in batches every 10 ms.
    rate: usize,
    secs: u64,
    /// Seconds into the load at which every client drops and resumes.
    storm_at: u64,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Latencies in 100 µs buckets up to 10 s.
struct Hist(Vec<AtomicU32>);

impl Hist {
    fn new() -> Self {
        Self((0..100_000).map(|_| AtomicU32::new(0)).collect())
    }

    fn record(&self, us: u64) {
        let b = ((us / 100) as usize).min(self.0.len() - 1);
        self.0[b].fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.0.iter().map(|c| u64::from(c.load(Ordering::Relaxed))).sum()
    }

    /// The `p` quantile in ms (the bucket's upper edge), NaN when empty.
    fn quantile(&self, p: f64) -> f64 {
        let n = self.count();
        if n == 0 {
            return f64::NAN;
        }
        let want = ((n as f64 - 1.0) * p).round() as u64 + 1;
        let mut seen = 0;
        for (i, c) in self.0.iter().enumerate() {
            seen += u64::from(c.load(Ordering::Relaxed));
            if seen >= want {
                return (i + 1) as f64 * 0.1;
            }
        }
        f64::NAN
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sse,
    Ws,
    /// SSE from the naive gateway.
    Naive,
}

struct Spec {
    kind: Kind,
    full: bool,
    sources: Vec<usize>,
}

/// What every client shares.
pub(super) struct Shared {
    pub(super) base: String,
    naive_base: String,
    pub(super) token: String,
    pub(super) prefix: String,
    http: reqwest::Client,
    /// The SSE clients' connections: a read buffer of `SSE_READ` bytes each.
    sse: SseClient,
    /// Event id → send time (µs since the epoch), for notifications.
    ids: RwLock<HashMap<String, u64>>,
    /// full before the storm, full after, notify before, notify after, naive.
    hists: Vec<Hist>,
    delivered: AtomicU64,
    subscribed: AtomicUsize,
    storm_at: OnceLock<Instant>,
    /// The gateway's process ([`gateway_process`]).
    pub(super) gateway_pid: u32,
}

impl Shared {
    /// The gateway's process's VmRSS, in KiB.
    pub(super) fn gateway_rss(&self) -> u64 {
        rss_kib_of(&self.gateway_pid.to_string())
    }

    fn channel(&self, source: usize) -> String {
        format!("{}:user:s{source}", self.prefix)
    }
}

/// One channel's deliveries to one client.
#[derive(Clone)]
struct Chan {
    source: usize,
    /// The channel's next offset in the first `subscribed` token.
    start: Option<i64>,
    count: u64,
    /// Offsets not above the last one delivered (duplicates or disorder).
    dups: u64,
    last: i64,
    sum: u64,
}

/// What one client saw.
#[derive(Default)]
struct Got {
    chans: Vec<Chan>,
    delivered: u64,
    slow_closes: usize,
    other_closes: usize,
    eofs: usize,
    errors: usize,
    first_error: Option<String>,
    other_items: usize,
    undecodable: usize,
    unmatched: usize,
    storm_sub: Option<Duration>,
    storm_first: Option<Duration>,
    /// After the storm: when its connection was open again (SSE: the
    /// response's headers; WebSocket: the handshake).
    storm_open: Option<Duration>,
    ws: bool,
}

fn field_str<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(key)? + key.len();
    let rest = &text[at..];
    Some(&rest[..rest.find('"')?])
}

fn field_num(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits = text[at..].trim_start();
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

impl Got {
    fn on_event(&mut self, shared: &Shared, spec: &Spec, data: &str) {
        let now = now_us();
        let (Some(src), Some(off)) = (field_str(data, "\"source_id\":\""), field_num(data, "\"offset\":")) else {
            self.undecodable += 1;
            return;
        };
        let sent = if spec.full {
            field_num(data, "\"t\":")
        } else {
            field_str(data, "\"id\":\"").and_then(|id| shared.ids.read().expect("ids").get(id).copied())
        };
        let after = usize::from(shared.storm_at.get().is_some());
        let hist = match spec.kind {
            Kind::Naive => 4,
            _ if spec.full => after,
            _ => 2 + after,
        };
        match sent {
            Some(t) => shared.hists[hist].record(now.saturating_sub(t)),
            None => self.unmatched += 1,
        }
        let idx = src.strip_prefix('s').and_then(|s| s.parse::<usize>().ok());
        match self.chans.iter_mut().find(|c| Some(c.source) == idx) {
            Some(c) if (off as i64) <= c.last => c.dups += 1,
            Some(c) => {
                c.count += 1;
                c.sum = c.sum.wrapping_add(off);
                c.last = off as i64;
            }
            None => self.undecodable += 1,
        }
        self.delivered += 1;
        shared.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

/// One item from either transport: its kind, its JSON and its resume token,
/// borrowed from the connection's buffer (a client reads about 140 items a
/// second at 5,000 events/s, on the cores the gateway runs on: it copies
/// nothing per item).
struct Item<'a> {
    kind: &'a str,
    data: Cow<'a, str>,
    token: Option<&'a str>,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

enum Conn {
    /// `buf[at..]` is not parsed yet; no frame ends before `scanned`.
    Sse { body: futures::stream::BoxStream<'static, Result<bytes::Bytes, String>>, buf: Vec<u8>, at: usize, scanned: usize },
    /// `last`: the text message the last item borrows.
    Ws { ws: Box<Ws>, last: Option<Message> },
}

type SseClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

/// What an SSE client reads at once. hyper's default grows a busy
/// connection's buffer to about 400 KiB: with 1,000 SSE clients behind a
/// loaded gateway, about 100 MiB of this process that is no memory of the
/// gateway's.
const SSE_READ: usize = 16 << 10;

fn sse_client() -> SseClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http1_read_buf_exact_size(SSE_READ)
        .build_http()
}

/// An SSE frame with neither `event:` nor `data:` (a keep-alive comment).
fn sse_empty(frame: &[u8]) -> bool {
    !frame.split(|&b| b == b'\n').any(|l| l.starts_with(b"event:") || l.starts_with(b"data:"))
}

/// What an SSE client keeps between reads at most, when it has read
/// everything it was sent: hyper's chunks reach hundreds of KiB under load.
const SSE_KEEP: usize = 64 << 10;

impl Conn {
    async fn next(&mut self) -> Option<Item<'_>> {
        match self {
            Conn::Sse { body, buf, at, scanned } => {
                let (start, end) = loop {
                    let from = (*scanned).max(*at);
                    if let Some(i) = buf[from..].windows(2).position(|w| w == b"\n\n") {
                        let (start, end) = (*at, from + i);
                        *at = end + 2;
                        *scanned = *at;
                        if sse_empty(&buf[start..end]) {
                            continue;
                        }
                        break (start, end);
                    }
                    // Keep the unparsed tail at the front: one move a chunk,
                    // not one an item.
                    buf.drain(..*at);
                    *at = 0;
                    *scanned = buf.len().saturating_sub(1);
                    if buf.is_empty() && buf.capacity() > SSE_KEEP {
                        buf.shrink_to(SSE_KEEP);
                    }
                    match body.next().await {
                        Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                        _ => return None,
                    }
                };
                let text = match std::str::from_utf8(&buf[start..end]) {
                    Ok(t) => t,
                    Err(_) => return Some(Item { kind: "invalid", data: Cow::Borrowed(""), token: None }),
                };
                let (mut kind, mut data, mut token) = ("", Cow::Borrowed(""), None);
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim_start();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        token = Some(v.trim_start());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        let v = v.strip_prefix(' ').unwrap_or(v);
                        if data.is_empty() {
                            data = Cow::Borrowed(v);
                        } else {
                            data.to_mut().push_str(v);
                        }
                    }
                }
                Some(Item { kind, data, token })
            }
            Conn::Ws { ws, last } => {
                loop {
                    match ws.next().await {
                        Some(Ok(m @ Message::Text(_))) => {
                            *last = Some(m);
                            break;
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                            return Some(Item { kind: "close", data: Cow::Owned(reason), token: None });
                        }
                        Some(Ok(_)) => continue,
                        _ => return None,
                    }
                }
                let Some(Message::Text(t)) = last.as_ref() else { return None };
                let data = t.as_str();
                let kind = field_str(data, "\"kind\":\"").unwrap_or("");
                let token = field_str(data, "\"token\":\"");
                Some(Item { kind, data: Cow::Borrowed(data), token })
            }
        }
    }
}

pub(super) fn urlenc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn open(shared: &Shared, spec: &Spec, resume: Option<&str>) -> Result<Conn, String> {
    let channels: Vec<String> = spec.sources.iter().map(|s| shared.channel(*s)).collect();
    let mode = if spec.full { "full" } else { "notify" };
    if spec.kind == Kind::Ws {
        let mut req = format!("{}/v1/ws", shared.base.replace("http://", "ws://"))
            .into_client_request()
            .map_err(|e| e.to_string())?;
        req.headers_mut().insert("authorization", format!("Bearer {}", shared.token).parse().expect("header"));
        // tungstenite reads into a 128 KiB buffer by default, resident once
        // touched: 125 MiB of this process for 1,000 clients, counted in the
        // RSS rows though it is no memory of the gateway's. 8 KiB, as
        // hyper's read buffer for the SSE clients.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8 << 10);
        let (mut ws, _) =
            tokio_tungstenite::connect_async_with_config(req, Some(config), false).await.map_err(|e| e.to_string())?;
        let cmd = serde_json::json!({"op": "subscribe", "channels": channels, "mode": mode, "resume": resume});
        ws.send(Message::Text(cmd.to_string().into())).await.map_err(|e| e.to_string())?;
        return Ok(Conn::Ws { ws: Box::new(ws), last: None });
    }
    let query: Vec<String> = channels.iter().map(|c| format!("channel={}", urlenc(c))).collect();
    let url = match spec.kind {
        Kind::Naive => format!("{}/naive?{}", shared.naive_base, query.join("&")),
        _ => format!("{}/v1/stream?{}&mode={mode}", shared.base, query.join("&")),
    };
    let mut req = axum::http::Request::get(url)
        .header("accept", "text/event-stream")
        .header("authorization", format!("Bearer {}", shared.token));
    if let Some(t) = resume {
        req = req.header("last-event-id", t);
    }
    let req = req.body(http_body_util::Empty::new()).map_err(|e| e.to_string())?;
    let r = shared.sse.request(req).await.map_err(|e| e.to_string())?;
    if r.status() != 200 {
        let status = r.status();
        let text = r.into_body().collect().await.map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned());
        return Err(format!("{status}: {}", text.unwrap_or_default()));
    }
    let body = http_body_util::BodyDataStream::new(r.into_body());
    Ok(Conn::Sse { body: body.map(|r| r.map_err(|e| e.to_string())).boxed(), buf: Vec::new(), at: 0, scanned: 0 })
}

/// A client: connect, read, and on any close or end reconnect with the last
/// token; on a storm signal drop the connection and resume.
async fn client(
    shared: Arc<Shared>,
    spec: Spec,
    mut storm: watch::Receiver<u32>,
    mut stop: watch::Receiver<bool>,
) -> Got {
    let mut got = Got {
        chans: spec
            .sources
            .iter()
            .map(|&s| Chan { source: s, start: None, count: 0, dups: 0, last: -1, sum: 0 })
            .collect(),
        ws: spec.kind == Kind::Ws,
        ..Got::default()
    };
    let mut token: Option<String> = None;
    let mut first_sub = true;
    let mut resumed_at: Option<Instant> = None;
    loop {
        let conn = tokio::select! {
            biased;
            _ = stop.changed() => return got,
            c = open(&shared, &spec, token.as_deref()) => c,
        };
        let mut conn = match conn {
            Ok(c) => {
                if let (Some(at), None) = (resumed_at, got.storm_open) {
                    got.storm_open = Some(at.elapsed());
                }
                c
            }
            Err(e) => {
                got.errors += 1;
                got.first_error.get_or_insert(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let item = tokio::select! {
                biased;
                _ = stop.changed() => return got,
                _ = storm.changed() => {
                    resumed_at = shared.storm_at.get().copied();
                    break;
                }
                item = conn.next() => item,
            };
            let Some(item) = item else {
                got.eofs += 1;
                break;
            };
            match item.kind {
                "subscribed" => {
                    if first_sub {
                        first_sub = false;
                        let t = item.token.and_then(|t| ResumeToken::decode(t).ok());
                        for c in &mut got.chans {
                            c.start = t.as_ref().and_then(|t| t.position_of(&shared.channel(c.source))).map(|p| p.1);
                        }
                        shared.subscribed.fetch_add(1, Ordering::Relaxed);
                    }
                    if let (Some(at), None) = (resumed_at, got.storm_sub) {
                        got.storm_sub = Some(at.elapsed());
                    }
                }
                "event" => {
                    got.on_event(&shared, &spec, &item.data);
                    if let (Some(at), None) = (resumed_at, got.storm_first) {
                        got.storm_first = Some(at.elapsed());
                    }
                }
                "close" => {
                    if item.data.contains("slow_client") {
                        got.slow_closes += 1;
                    } else {
                        got.other_closes += 1;
                    }
                    break;
                }
                _ => got.other_items += 1,
            }
            if let Some(t) = item.token {
                match &mut token {
                    Some(kept) => {
                        kept.clear();
                        kept.push_str(t);
                    }
                    None => token = Some(t.to_owned()),
                }
            }
        }
    }
}

/// `GET /naive?channel=..`: a Redis Pub/Sub connection of its own,
/// subscribed to the channels, every message forwarded as an SSE `event`.
async fn naive_stream(
    axum::extract::State(client): axum::extract::State<redis::Client>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> axum::response::Response {
    use axum::response::sse::{Event as SseEvent, Sse};
    use axum::response::IntoResponse;
    let channels: Vec<String> = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .filter(|(k, _)| k == "channel")
        .map(|(_, v)| v.into_owned())
        .collect();
    let unavailable =
        |e: redis::RedisError| (axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
    let mut ps = match client.get_async_pubsub().await {
        Ok(p) => p,
        Err(e) => return unavailable(e),
    };
    for c in &channels {
        if let Err(e) = ps.subscribe(c).await {
            return unavailable(e);
        }
    }
    let first =
        futures::stream::once(async { Ok::<_, Infallible>(SseEvent::default().event("subscribed").data("{}")) });
    let events = ps
        .into_on_message()
        .map(|m| Ok(SseEvent::default().event("event").data(String::from_utf8_lossy(m.get_payload_bytes()))));
    Sse::new(first.chain(events)).into_response()
}

/// Sockets of process `pid` connected to `port` (from /proc/PID/fd and
/// /proc/net/tcp{,6}).
fn connections_to(pid: u32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let hex = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|t| {
            t.lines()
                .skip(1)
                .filter(|l| {
                    let c: Vec<&str> = l.split_whitespace().collect();
                    c.len() > 9 && c[2].ends_with(&hex) && c[3] == "01" && inodes.contains(c[9])
                })
                .count()
        })
        .sum()
}

fn port_of(url: &str) -> u16 {
    let host = url.split("://").last().unwrap_or(url).split('/').next().unwrap_or_default();
    host.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
}

/// CPU ticks: (the gateway's process `pid` but its librdkafka threads, its
/// librdkafka threads `rdk:*`, this process: clients, ingest, the bench).
fn thread_ticks(pid: u32) -> (u64, u64, u64) {
    let mut t = (0, 0, proc_ticks("self").unwrap_or(0));
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let ticks = proc_ticks(&format!("{pid}/task/{tid}")).unwrap_or(0);
        if comm.starts_with("rdk:") {
            t.1 += ticks;
        } else {
            t.0 += ticks;
        }
    }
    t
}

fn rdkafka_clients(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "rdk:main"))
        .count()
}

async fn redis_clients(conn: &mut redis::aio::MultiplexedConnection) -> i64 {
    let info: String = redis::cmd("INFO").arg("clients").query_async(conn).await.unwrap_or_default();
    info.lines().find_map(|l| l.strip_prefix("connected_clients:")?.trim().parse().ok()).unwrap_or(-1)
}

/// Post `rate` events/s for `secs` in batches every 10 ms, round-robin over
/// the sources, each with its send time in the payload and in `ids`; the
/// events stored, errors and events per source.
async fn ingest(shared: Arc<Shared>, producer: String, k: Knobs) -> (u64, u64, Vec<u64>) {
    let per_tick = (k.rate / 100).max(1);
    let url = format!("{}/v1/events", shared.base);
    let mut per_source = vec![0u64; k.sources];
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let started = Instant::now();
    let mut n = 0usize;
    let mut posts = Vec::new();
    while started.elapsed() < Duration::from_secs(k.secs) {
        tick.tick().await;
        let mut body = String::with_capacity(per_tick * 160);
        body.push('[');
        let mut ids = Vec::with_capacity(per_tick);
        let t = now_us();
        for i in n..n + per_tick {
            let source = i % k.sources;
            per_source[source] += 1;
            let id = dualstream::EventId::new().to_string();
            if i > n {
                body.push(',');
            }
            body.push_str(&format!(
                r#"{{"id":"{id}","type":"bench.tick","source_type":"user","source_id":"s{source}","payload":{{"t":{t}}}}}"#
            ));
            ids.push(id);
        }
        body.push(']');
        n += per_tick;
        shared.ids.write().expect("ids").extend(ids.into_iter().map(|id| (id, t)));
        let req = shared.http.post(&url).bearer_auth(&producer).header("content-type", "application/json").body(body);
        posts.push(tokio::spawn(async move {
            match req.send().await {
                Ok(r) if r.status() == 200 => r
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v["stored"].as_u64())
                    .map_or((0, 1), |s| (s, 0)),
                _ => (0, 1),
            }
        }));
    }
    let (mut stored, mut errors) = (0, 0);
    for p in posts {
        let (s, e) = p.await.unwrap_or((0, 1));
        stored += s;
        errors += e;
    }
    (stored, errors, per_source)
}

/// Wait until deliveries stop growing for 2 s (at most 30 s).
async fn settle(shared: &Shared) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut still) = (shared.delivered.load(Ordering::Relaxed), Instant::now());
    while Instant::now() < deadline && still.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = shared.delivered.load(Ordering::Relaxed);
        if now != last {
            (last, still) = (now, Instant::now());
        }
    }
}

/// Seeded channel sets: 1–10 distinct sources each (splitmix64).
fn channel_sets(n: usize, sources: usize) -> Vec<Vec<usize>> {
    let mut state = 0x5eed_u64;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..n)
        .map(|_| {
            let k = 1 + (next() % 10) as usize;
            let mut set: Vec<usize> = Vec::with_capacity(k);
            while set.len() < k.min(sources) {
                let s = (next() % sources as u64) as usize;
                if !set.contains(&s) {
                    set.push(s);
                }
            }
            set
        })
        .collect()
}

/// Start clients 100 at a time, each batch once the previous one is
/// subscribed (at most 30 s a batch); how long it took.
async fn start_clients(
    shared: &Arc<Shared>,
    specs: Vec<Spec>,
    storm: &watch::Receiver<u32>,
    stop: &watch::Receiver<bool>,
) -> (Vec<tokio::task::JoinHandle<Got>>, f64) {
    let started = Instant::now();
    let base = shared.subscribed.load(Ordering::Relaxed);
    let mut tasks = Vec::with_capacity(specs.len());
    for spec in specs {
        tasks.push(tokio::spawn(client(Arc::clone(shared), spec, storm.clone(), stop.clone())));
        if tasks.len() % 100 == 0 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while shared.subscribed.load(Ordering::Relaxed) - base < tasks.len() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if Instant::now() >= deadline {
                println!(
                    "  only {} of {} clients subscribed after 30 s: not waiting for the rest",
                    shared.subscribed.load(Ordering::Relaxed) - base,
                    tasks.len()
                );
                break;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.subscribed.load(Ordering::Relaxed) - base < tasks.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (tasks, started.elapsed().as_secs_f64())
}

/// Figures of one run, for the rows.
#[derive(Default)]
struct Run {
    deliveries_per_s: f64,
    rss_before: u64,
    rss_idle: u64,
    rss_after: u64,
    redis_conns: usize,
    redis_info: i64,
    kafka_conns: usize,
    rdkafka_clients: usize,
    gw_cores: f64,
    rdk_cores: f64,
    client_cores: f64,
    broker_cores: Option<f64>,
    redis_cores: Option<f64>,
    stored: u64,
    ingest_errors: u64,
    connect_secs: f64,
    subscribed: usize,
    got: Vec<Got>,
    per_source: Vec<u64>,
    /// How late a 10 ms sleep woke on the gateway's runtime and on the
    /// clients' (ours only): before the storm and after it began.
    lag: Option<LagFigures>,
}

/// A runtime's lateness (see [`Lag`]), in ms: p50, p99 and the most,
/// before the storm and after it began.
#[derive(Clone, Copy, Default)]
struct LagFigures {
    gateway: [[f64; 3]; 2],
    clients: [[f64; 3]; 2],
}

/// The gateway's process's answer to `lag stop`: six figures.
fn parse_lag(line: &str) -> [[f64; 3]; 2] {
    let v: Vec<f64> = line.split(' ').map(|x| x.parse().unwrap_or(f64::NAN)).collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(f64::NAN);
    [[at(0), at(1), at(2)], [at(3), at(4), at(5)]]
}

impl LagFigures {
    fn describe(&self) -> String {
        let f = |x: &[f64; 3]| format!("p50 {:.1} / p99 {:.1} / max {:.0} ms", x[0], x[1], x[2]);
        format!(
            "a 10 ms sleep woke late by: on the gateway's runtime {} before the storm, {} after it began; on the clients' runtime {} before, {} after",
            f(&self.gateway[0]),
            f(&self.gateway[1]),
            f(&self.clients[0]),
            f(&self.clients[1])
        )
    }
}

/// A task that sleeps 10 ms in a loop on a runtime and records how late it
/// woke: how long any task there waits for its turn, the clients' as well
/// as the gateway's (a storm's waits are in both).
struct Lag {
    samples: Arc<std::sync::Mutex<Vec<(Instant, Duration)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Lag {
    fn start(rt: &tokio::runtime::Handle) -> Self {
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let into = Arc::clone(&samples);
        let task = rt.spawn(async move {
            let tick = Duration::from_millis(10);
            loop {
                let at = Instant::now();
                tokio::time::sleep(tick).await;
                let late = at.elapsed().saturating_sub(tick);
                into.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((at, late));
            }
        });
        Self { samples, task }
    }

    /// p50, p99 and the most, before `split` and from it on.
    fn stop(self, split: Option<Instant>) -> [[f64; 3]; 2] {
        self.task.abort();
        let samples = std::mem::take(&mut *self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let mut parts = [Vec::new(), Vec::new()];
        for (at, late) in samples {
            parts[usize::from(split.is_some_and(|s| at >= s))].push(late);
        }
        parts.map(|mut v| {
            v.sort();
            let max = v.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
            [super::percentile(&v, 0.5), super::percentile(&v, 0.99), max]
        })
    }
}

impl Run {
    fn sum(&self, f: impl Fn(&Got) -> usize) -> usize {
        self.got.iter().map(f).sum()
    }
}

#[allow(clippy::too_many_arguments)]
async fn load_phase(
    shared: &Arc<Shared>,
    producer: &str,
    k: &Knobs,
    pids: &Pids,
    redis_conn: &mut redis::aio::MultiplexedConnection,
    ports: (u16, u16),
    storm: Option<&watch::Sender<u32>>,
    admin: Option<&str>,
    run: &mut Run,
) {
    let (ticks0, snap0, delivered0, t0) =
        (thread_ticks(shared.gateway_pid), CpuSnap::take(pids), shared.delivered.load(Ordering::Relaxed), Instant::now());
    let load = tokio::spawn(ingest(Arc::clone(shared), producer.to_owned(), *k));
    // Connections and memory in the middle of the load (before the storm).
    tokio::time::sleep(Duration::from_secs(k.storm_at.min(k.secs) / 2 + 1)).await;
    run.redis_conns = connections_to(shared.gateway_pid, ports.0);
    run.kafka_conns = connections_to(shared.gateway_pid, ports.1);
    run.redis_info = redis_clients(redis_conn).await;
    run.rdkafka_clients = rdkafka_clients(shared.gateway_pid);
    if let Some(storm) = storm {
        let left = Duration::from_secs(k.storm_at).saturating_sub(t0.elapsed());
        tokio::time::sleep(left).await;
        let _ = shared.storm_at.set(Instant::now());
        let _ = storm.send(1);
        println!("  storm: every client drops and resumes; the gateway's RSS {} MiB", shared.gateway_rss() >> 10);
    }
    let (stored, errors, per_source) = load.await.expect("ingest");
    let secs = t0.elapsed().as_secs_f64();
    let (ticks1, snap1) = (thread_ticks(shared.gateway_pid), CpuSnap::take(pids));
    run.deliveries_per_s = (shared.delivered.load(Ordering::Relaxed) - delivered0) as f64 / secs;
    run.rss_after = shared.gateway_rss();
    // What the gateway holds at that moment (its buffers, before they drain).
    let held = match admin {
        Some(admin) => match shared.http.get(format!("{}/readyz", shared.base)).bearer_auth(admin).send().await {
            Ok(r) => r.json::<serde_json::Value>().await.map_or_else(
                |_| String::new(),
                |v| format!("; clients {}, hub {}, history {}", v["clients"], v["hub"], v["history"]),
            ),
            Err(_) => String::new(),
        },
        None => String::new(),
    };
    println!("  end of the load: the gateway's RSS {} MiB{held}", run.rss_after >> 10);
    let cores = |a: u64, b: u64| a.saturating_sub(b) as f64 / clock_ticks() / secs;
    (run.gw_cores, run.rdk_cores, run.client_cores) =
        (cores(ticks1.0, ticks0.0), cores(ticks1.1, ticks0.1), cores(ticks1.2, ticks0.2));
    run.broker_cores = snap1.broker.zip(snap0.broker).map(|(a, b)| cores(a, b));
    run.redis_cores = snap1.redis.zip(snap0.redis).map(|(a, b)| cores(a, b));
    (run.stored, run.ingest_errors, run.per_source) = (stored, errors, per_source);
    settle(shared).await;
}

/// Every other pair of clients in `mode=full`; none with
/// `DUALSTREAM_BENCH_GW_FULL=0` (to tell the full clients' cost from the
/// notify clients' latency).
fn specs(sets: &[Vec<usize>], kinds: &[Kind]) -> Vec<Spec> {
    let with_full = knob("FULL", 1) != 0;
    sets.iter()
        .enumerate()
        .map(|(i, s)| Spec {
            kind: kinds[i % kinds.len()],
            full: with_full && (i / kinds.len()) % 2 == 1,
            sources: s.clone(),
        })
        .collect()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Got>>, stop: &watch::Sender<bool>) -> Vec<Got> {
    let _ = stop.send(true);
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("client"));
    }
    out
}

/// The group's knobs, from `DUALSTREAM_BENCH_GW_*`.
fn knobs() -> Knobs {
    Knobs {
        clients: knob("CLIENTS", 1_000),
        sources: knob("SOURCES", 200),
        rate: knob("RATE", 5_000),
        secs: knob("SECS", 24) as u64,
        storm_at: knob("STORM_AT", 14) as u64,
    }
}

/// Whether the open-files limit allows the clients (each a socket here and
/// one in the gateway; the naive run adds a Redis connection each).
fn enough_open_files(k: &Knobs) -> bool {
    let nofile = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Max open files"))?.split_whitespace().nth(3)?.parse::<usize>().ok()
        })
        .unwrap_or(0);
    let need = k.clients * 2 * 3 + 500;
    println!("  open-files limit {nofile} (need about {need})");
    if nofile < need {
        println!("  raise it first: `ulimit -n 65536` (the hard limit allows {nofile}?); skipping the gateway group");
    }
    nofile >= need
}

/// Both gateways on a runtime of their own, and what the clients share.
pub(super) struct Setup {
    /// The gateway's process: it ends when its stdin closes.
    child: tokio::process::Child,
    /// Its stdin and stdout, for [`Setup::command`].
    io: tokio::sync::Mutex<(tokio::process::ChildStdin, tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>)>,
    pub(super) shared: Arc<Shared>,
    /// A token that may publish (ingest).
    producer: String,
    /// A token with the admin claim (`/readyz`'s details).
    admin: String,
}

impl Setup {
    /// Send the gateway's process a command ([`gateway_process`]); its
    /// answer, for `lag stop`, else empty.
    async fn command(&self, line: &str) -> String {
        let mut io = self.io.lock().await;
        if io.0.write_all(format!("{line}\n").as_bytes()).await.is_err() || !line.starts_with("lag stop") {
            return String::new();
        }
        tokio::time::timeout(Duration::from_secs(10), io.1.next_line()).await.ok().and_then(Result::ok).flatten().unwrap_or_default()
    }

    /// End the gateway's process: close its stdin, and kill it after 10 s.
    pub(super) async fn stop(mut self) {
        drop(self.io);
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// The gateway's `replay.fetch_wait_max_ms` here: 5, or
/// `DUALSTREAM_BENCH_GW_FETCH_WAIT_MS`.
fn fetch_wait_ms() -> u64 {
    knob("FETCH_WAIT_MS", 5) as u64
}

/// Which of the group's gateway settings a run changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tweak {
    /// The group's.
    None,
    /// Room for this many connections and streams (the idle rows).
    Room(usize),
    /// The default far-resume limits (the neighbour row).
    FarDefaults,
}

impl Tweak {
    fn encode(self) -> String {
        match self {
            Tweak::None => "none".into(),
            Tweak::Room(n) => format!("room:{n}"),
            Tweak::FarDefaults => "far-defaults".into(),
        }
    }

    fn decode(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Tweak::None),
            "far-defaults" => Some(Tweak::FarDefaults),
            _ => s.strip_prefix("room:")?.parse().ok().map(Tweak::Room),
        }
    }

    fn apply(self, c: &mut GatewayConfig) {
        match self {
            Tweak::None => {}
            Tweak::Room(n) => {
                c.limits.max_connections = n;
                c.limits.max_streams = n;
            }
            Tweak::FarDefaults => {
                let defaults = GatewayConfig::default().limits;
                c.limits.far_resumes_per_min = defaults.far_resumes_per_min;
                c.limits.far_items_per_sec = defaults.far_items_per_sec;
            }
        }
    }
}

/// Set in the gateway's process (this binary again): `<brokers> <redis url>
/// <topic> <channel prefix> <tweak>`.
pub(super) const GATEWAY_ENV: &str = "DUALSTREAM_BENCH_GATEWAY_PROCESS";

/// The gateway's process: our gateway and the naive one on a runtime of
/// their own (threads `gw-rt`), as a deployment runs them, apart from the
/// clients: its RSS and CPU are the gateways' alone. Prints `<base> <naive
/// base> <reader token> <producer token> <admin token>`, then serves until
/// stdin closes.
pub(super) async fn gateway_process(spec: &str) {
    let parts: Vec<&str> = spec.split(' ').collect();
    let [brokers, redis_url, topic, prefix, tweak] = parts[..] else { panic!("{GATEWAY_ENV}={spec:?}: want 5 fields") };
    let tweak = Tweak::decode(tweak).unwrap_or_else(|| panic!("{GATEWAY_ENV}: tweak {tweak:?}"));
    let client = redis::Client::open(redis_url).expect("redis url");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gw-rt")
        .on_thread_start(|| {
            #[cfg(feature = "heap-domains")]
            super::domains::enter_gateway();
        })
        .enable_all()
        .build()
        .expect("gateway runtime");
    // The heap beside the RSS every 2 s, on stderr: when the growth comes.
    #[cfg(feature = "heap-domains")]
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_secs(2));
        eprintln!("  heap: RSS {} MiB{}", super::measure::rss_kib_of("self") >> 10, super::heap_note());
    });
    let mut config = GatewayConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        kafka_brokers: brokers.to_owned(),
        redis_url: redis_url.to_owned(),
        topic: topic.to_owned(),
        dashboard: false,
        auth: AuthConfig { secret: SECRET.into(), ..AuthConfig::default() },
        ..GatewayConfig::default()
    };
    config.redis.channel_prefix = prefix.to_owned();
    // Every client here holds the one token (subject "bench") on one
    // address: the per-subject and per-address stream limits (16 and 32 by
    // default), the far resumes per subject (120 a minute; the reconnect
    // storm resumes 2,000 clients at once) and the pace of far history per
    // subject (1,000 items a second, shared here by all 2,000 clients) are
    // for clients on the internet. The neighbour row restores the last two.
    config.limits.max_streams_per_subject = 100_000;
    config.limits.max_streams_per_address = 100_000;
    config.limits.far_resumes_per_min = 1_000_000;
    config.limits.far_items_per_sec = 10_000_000;
    // tansu 0.6 holds every fetch for the whole `fetch.wait.max.ms`, with
    // data or without (docs/operations.md), so the shared reader's records,
    // and with them every `mode=full` item, arrive 1–2 waits after they
    // were written. The bench runs the gateway as docs/operations.md says
    // to on tansu: `replay.fetch_wait_max_ms` = 5 (the default, 50, with
    // `DUALSTREAM_BENCH_GW_FETCH_WAIT_MS=50`).
    config.replay.fetch_wait_max_ms = fetch_wait_ms();
    // Diagnostic (not for committed runs): the backfill readers, whose
    // caches hold what far resumes read; the tail cache; the hub's buffer
    // of live notifications for each join; a join's buffer,
    // and what a connection's joins may read ahead, in items and in bytes.
    config.join.backfill_readers = knob("BACKFILL_READERS", config.join.backfill_readers);
    config.join.cache_records = knob("CACHE_RECORDS", config.join.cache_records);
    config.hub.subscriber_buffer = knob("HUB_BUFFER", config.hub.subscriber_buffer);
    config.join.buffer = knob("JOIN_BUFFER", config.join.buffer);
    config.limits.client_buffer = knob("CLIENT_BUFFER", config.limits.client_buffer);
    config.limits.client_buffer_bytes = knob("CLIENT_BUFFER_BYTES", config.limits.client_buffer_bytes);
    tweak.apply(&mut config);
    let (gateway, base) = rt
        .spawn(async move {
            let gateway = Gateway::new(config).await.expect("gateway");
            // As the gateway's binary listens (`dualstream_gateway::listen`).
            let listener = dualstream_gateway::listen("127.0.0.1:0".parse().expect("addr")).expect("bind");
            let base = format!("http://{}", listener.local_addr().expect("addr"));
            let g = gateway.clone();
            tokio::spawn(async move { g.serve(listener, std::future::pending()).await });
            (gateway, base)
        })
        .await
        .expect("gateway task");
    let naive_base = rt
        .spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let base = format!("http://{}", listener.local_addr().expect("addr"));
            let app = axum::Router::new().route("/naive", axum::routing::get(naive_stream)).with_state(client);
            tokio::spawn(async move { axum::serve(listener, app).await });
            base
        })
        .await
        .expect("naive task");
    let auth = gateway.auth();
    let mint = |read: Vec<String>, publish: Vec<String>| {
        auth.mint(&auth.claims(Some("bench".into()), read, publish, 3_600)).expect("mint")
    };
    let reader = mint(vec![format!("{prefix}:user:*")], vec![]);
    let producer = mint(vec![], vec!["user".into()]);
    let admin = auth
        .mint(&dualstream_gateway::Claims {
            admin: true,
            ..auth.claims(Some("bench-admin".into()), vec![], vec![], 3_600)
        })
        .expect("mint");
    println!("{base} {naive_base} {reader} {producer} {admin}");
    // Commands, a line each, until stdin closes: `lag start`, and `lag stop
    // <ms since the storm began, or ->`, answered with the six figures of
    // [`LagFigures::gateway`].
    let mut commands = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut lag = None;
    while let Ok(Some(line)) = commands.next_line().await {
        #[cfg(feature = "heap-domains")]
        eprintln!("  the gateway's process at `{line}`:{}", super::heap_note());
        if line == "lag start" {
            lag = Some(Lag::start(rt.handle()));
        } else if let Some(ago) = line.strip_prefix("lag stop ") {
            let split = ago.parse::<u64>().ok().map(|ms| Instant::now() - Duration::from_millis(ms));
            let figures = lag.take().map_or([[f64::NAN; 3]; 2], |l: Lag| l.stop(split));
            let text: Vec<String> = figures.iter().flatten().map(f64::to_string).collect();
            println!("{}", text.join(" "));
        }
    }
    gateway.close_streams();
    drop(gateway);
    rt.shutdown_background();
}

/// Start the gateway's process ([`gateway_process`]), take its tokens, and
/// warm ingest up.
pub(super) async fn start(brokers: &str, redis_url: &str, topic: &str, tweak: Tweak) -> Setup {
    let prefix = format!("gwb{}", &dualstream::EventId::new().as_uuid().simple().to_string()[20..]);
    let spec = format!("{brokers} {redis_url} {topic} {prefix} {}", tweak.encode());
    let (mut child, mut lines) = super::measure::spawn_self(GATEWAY_ENV, spec, "the gateway's process");
    let pid = child.id().expect("the gateway's pid");
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("the gateway's process served within 120 s")
        .expect("its stdout")
        .expect("the gateway's process ended before it served");
    let fields: Vec<&str> = line.split(' ').collect();
    let [base, naive_base, reader, producer, admin] = fields[..] else { panic!("the gateway's process said {line:?}") };
    let (base, producer, admin) = (base.to_owned(), producer.to_owned(), admin.to_owned());
    let stdin = child.stdin.take().expect("stdin");
    let shared = Arc::new(Shared {
        base: base.clone(),
        naive_base: naive_base.to_owned(),
        token: reader.to_owned(),
        prefix,
        gateway_pid: pid,
        http: reqwest::Client::builder().pool_max_idle_per_host(64).build().expect("http"),
        sse: sse_client(),
        ids: RwLock::new(HashMap::new()),
        hists: (0..5).map(|_| Hist::new()).collect(),
        delivered: AtomicU64::new(0),
        subscribed: AtomicUsize::new(0),
        storm_at: OnceLock::new(),
    });
    // Warm up ingest (the producer's first idempotent ack).
    let warm =
        format!(r#"{{"type":"bench.warm","source_type":"user","source_id":"warm","payload":{{"t":{}}}}}"#, now_us());
    let r = shared
        .http
        .post(format!("{base}/v1/events"))
        .bearer_auth(&producer)
        .header("content-type", "application/json")
        .body(warm)
        .send()
        .await;
    assert!(r.is_ok_and(|r| r.status() == 200), "warm-up ingest");
    Setup { child, io: tokio::sync::Mutex::new((stdin, lines)), shared, producer, admin }
}

/// Where the load's connections are counted: Redis's and the broker's
/// ports, and a connection to Redis for `INFO`.
struct Probe {
    ports: (u16, u16),
    redis: redis::aio::MultiplexedConnection,
}

/// Ours: SSE and WebSocket clients alternate, every other pair in full
/// mode, through the load with a reconnect storm; the figures and the hub's
/// readiness at the end.
async fn run_ours(
    s: &Setup,
    k: &Knobs,
    sets: &[Vec<usize>],
    pids: &Pids,
    probe: &mut Probe,
) -> (Run, serde_json::Value) {
    let pid = s.shared.gateway_pid;
    let mut ours = Run { rss_before: s.shared.gateway_rss(), ..Run::default() };
    let base_redis =
        (connections_to(pid, probe.ports.0), connections_to(pid, probe.ports.1), redis_clients(&mut probe.redis).await);
    let base_rdk = rdkafka_clients(pid);
    let (storm_tx, storm_rx) = watch::channel(0u32);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (tasks, connect_secs) =
        start_clients(&s.shared, specs(sets, &[Kind::Sse, Kind::Ws]), &storm_rx, &stop_rx).await;
    ours.connect_secs = connect_secs;
    ours.subscribed = s.shared.subscribed.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    ours.rss_idle = s.shared.gateway_rss();
    println!(
        "  ours: {} of {} clients subscribed in {connect_secs:.1} s; the gateway's RSS {} → {} MiB",
        ours.subscribed,
        tasks.len(),
        ours.rss_before >> 10,
        ours.rss_idle >> 10,
    );
    s.command("lag start").await;
    let lag = Lag::start(&tokio::runtime::Handle::current());
    load_phase(&s.shared, &s.producer, k, pids, &mut probe.redis, probe.ports, Some(&storm_tx), Some(&s.admin), &mut ours).await;
    let storm_at = s.shared.storm_at.get().copied();
    let ago = storm_at.map_or("-".to_owned(), |at| at.elapsed().as_millis().to_string());
    let lag = LagFigures { gateway: parse_lag(&s.command(&format!("lag stop {ago}")).await), clients: lag.stop(storm_at) };
    println!("  ours: {}", lag.describe());
    ours.lag = Some(lag);
    let hub = match s.shared.http.get(format!("{}/readyz", s.shared.base)).bearer_auth(&s.admin).send().await {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .map(|v| {
                serde_json::json!({"hub": v["hub"], "live_checks": v["live_checks"], "clients": v["clients"], "history": v["history"]})
            })
            .unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    };
    ours.got = collect(tasks, &stop_tx).await;
    ours.redis_conns = ours.redis_conns.saturating_sub(base_redis.0);
    ours.kafka_conns = ours.kafka_conns.saturating_sub(base_redis.1);
    ours.redis_info -= base_redis.2;
    ours.rdkafka_clients = ours.rdkafka_clients.saturating_sub(base_rdk);
    (ours, hub)
}

/// The naive gateway: the same channel sets, all over SSE, the same load
/// (ingest through our gateway, which has no stream clients now); the
/// figures, with what its clients' channels carried and what they got.
async fn run_naive(
    s: &Setup,
    k: &Knobs,
    sets: &[Vec<usize>],
    pids: &Pids,
    probe: &mut Probe,
    ours: usize,
) -> (Run, u64, u64) {
    let pid = s.shared.gateway_pid;
    let mut naive = Run { rss_before: s.shared.gateway_rss(), ..Run::default() };
    let naive_base_redis = (connections_to(pid, probe.ports.0), redis_clients(&mut probe.redis).await);
    let (_storm_tx, storm_rx) = watch::channel(0u32);
    let (stop_tx, stop_rx) = watch::channel(false);
    let naive_specs: Vec<Spec> =
        sets.iter().map(|s| Spec { kind: Kind::Naive, full: false, sources: s.clone() }).collect();
    let (tasks, connect_secs) = start_clients(&s.shared, naive_specs, &storm_rx, &stop_rx).await;
    naive.connect_secs = connect_secs;
    naive.subscribed = s.shared.subscribed.load(Ordering::Relaxed) - ours;
    tokio::time::sleep(Duration::from_secs(1)).await;
    naive.rss_idle = s.shared.gateway_rss();
    println!(
        "  naive: {} of {} clients subscribed in {connect_secs:.1} s; the gateway's RSS {} → {} MiB",
        naive.subscribed,
        tasks.len(),
        naive.rss_before >> 10,
        naive.rss_idle >> 10
    );
    let naive_k = Knobs { storm_at: k.secs, ..*k };
    load_phase(&s.shared, &s.producer, &naive_k, pids, &mut probe.redis, probe.ports, None, None, &mut naive).await;
    naive.got = collect(tasks, &stop_tx).await;
    naive.redis_conns = naive.redis_conns.saturating_sub(naive_base_redis.0);
    naive.redis_info -= naive_base_redis.1;
    let naive_expected: u64 = sets.iter().map(|s| s.iter().map(|i| naive.per_source[*i]).sum::<u64>()).sum();
    let naive_delivered: u64 = naive.got.iter().map(|g| g.delivered).sum();
    let h = &s.shared.hists;
    println!(
        "  naive: {:.0} deliveries/s; latency p50 {:.1} p99 {:.1} ms; RSS {} MiB; redis conns {} (INFO +{}); delivered {naive_delivered} of {naive_expected}; cores: naive+gateway {:.2} clients {:.2} redis {:?}; eofs {} errors {}",
        naive.deliveries_per_s, h[4].quantile(0.5), h[4].quantile(0.99), naive.rss_after >> 10, naive.redis_conns,
        naive.redis_info, naive.gw_cores, naive.client_cores, naive.redis_cores, naive.sum(|g| g.eofs), naive.sum(|g| g.errors)
    );
    (naive, naive_expected, naive_delivered)
}

/// Each client's channels against an independent reading of the topic.
#[derive(Default)]
struct Exactness {
    records: usize,
    gaps: u64,
    dups: u64,
    mismatched: u64,
    extra: u64,
    no_start: u64,
    exact_clients: usize,
    /// Deliveries a client had not received yet when the run stopped (its
    /// channel's tail after the last offset it got): behind, not a gap.
    behind: u64,
    prefix_clients: usize,
    example: Option<String>,
}

/// Compare what every client got with the topic as a plain rdkafka
/// consumer reads it, from each channel's position in the client's first
/// token.
fn exactness(records: &[Record], sources: usize, got: &[Got]) -> Exactness {
    let mut by_source: Vec<Vec<i64>> = vec![Vec::new(); sources];
    for r in records {
        let e = r.event();
        if let Some(i) = e.source().source_id().strip_prefix('s').and_then(|s| s.parse::<usize>().ok()) {
            by_source[i].push(r.offset);
        }
    }
    by_source.iter_mut().for_each(|v| v.sort_unstable());
    let mut x = Exactness { records: records.len(), ..Exactness::default() };
    for (i, g) in got.iter().enumerate() {
        let (mut exact, mut prefix_ok) = (true, true);
        for c in &g.chans {
            let Some(start) = c.start else {
                x.no_start += 1;
                exact = false;
                continue;
            };
            let want: Vec<i64> = by_source[c.source].iter().copied().filter(|o| *o >= start).collect();
            let upto = want.iter().filter(|o| **o <= c.last).count() as u64;
            let sum = want.iter().filter(|o| **o <= c.last).fold(0u64, |a, o| a.wrapping_add(*o as u64));
            let prefix = c.count == upto && c.sum == sum && c.dups == 0;
            x.gaps += upto.saturating_sub(c.count);
            x.extra += c.count.saturating_sub(upto);
            x.behind += want.len() as u64 - upto;
            x.dups += c.dups;
            x.mismatched += u64::from(c.count == upto && c.sum != sum);
            prefix_ok &= prefix;
            if !prefix || upto < want.len() as u64 {
                exact = false;
                x.example.get_or_insert_with(|| {
                    format!(
                        "client {i} source s{}: want {} from offset {start}, got {} ({} dups)",
                        c.source,
                        want.len(),
                        c.count,
                        c.dups
                    )
                });
            }
        }
        x.exact_clients += usize::from(exact);
        x.prefix_clients += usize::from(prefix_ok);
    }
    x
}

/// The reconnect storm's figures: how many clients resubscribed and got an
/// item again, the last of each and the median first item, in ms.
struct Storm {
    subscribed: usize,
    live: usize,
    sub_max: f64,
    sub_p50: f64,
    first_max: f64,
    first_p50: f64,
    /// Each client's wait from its `subscribed` to its first item: median
    /// and longest, in ms.
    gap_p50: f64,
    gap_max: f64,
    /// When connections were open again (see [`Got::storm_open`]), median
    /// and last, in ms: SSE, WebSocket.
    open: [(f64, f64); 2],
}

fn storm(got: &[Got]) -> Storm {
    let mut subs: Vec<Duration> = got.iter().filter_map(|g| g.storm_sub).collect();
    let mut firsts: Vec<Duration> = got.iter().filter_map(|g| g.storm_first).collect();
    let mut gaps: Vec<Duration> =
        got.iter().filter_map(|g| Some(g.storm_first?.saturating_sub(g.storm_sub?))).collect();
    let max_ms = |v: &[Duration]| v.iter().max().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    subs.sort();
    firsts.sort();
    gaps.sort();
    let open = [false, true].map(|ws| {
        let mut v: Vec<Duration> = got.iter().filter(|g| g.ws == ws).filter_map(|g| g.storm_open).collect();
        v.sort();
        (super::percentile(&v, 0.5), max_ms(&v))
    });
    Storm {
        open,
        subscribed: subs.len(),
        live: firsts.len(),
        sub_max: max_ms(&subs),
        sub_p50: super::percentile(&subs, 0.5),
        first_max: max_ms(&firsts),
        first_p50: super::percentile(&firsts, 0.5),
        gap_p50: super::percentile(&gaps, 0.5),
        gap_max: max_ms(&gaps),
    }
}

fn print_ours(ours: &Run, h: &[Hist], x: &Exactness, st: &Storm, hub: &serde_json::Value) {
    println!(
        "  ours: {:.0} deliveries/s; latency full p50 {:.1} p99 {:.1} ms (after the storm p50 {:.1} p99 {:.1}), notify p50 {:.1} p99 {:.1} ms (after {:.1} / {:.1}); RSS {} MiB; redis conns {} (INFO +{}), kafka conns {}, rdkafka clients {}; cores: gateway {:.2} rdkafka {:.2} clients {:.2} broker {:?} redis {:?}",
        ours.deliveries_per_s, h[0].quantile(0.5), h[0].quantile(0.99), h[1].quantile(0.5), h[1].quantile(0.99),
        h[2].quantile(0.5), h[2].quantile(0.99), h[3].quantile(0.5), h[3].quantile(0.99), ours.rss_after >> 10,
        ours.redis_conns, ours.redis_info, ours.kafka_conns, ours.rdkafka_clients, ours.gw_cores, ours.rdk_cores,
        ours.client_cores, ours.broker_cores, ours.redis_cores
    );
    println!(
        "  exact clients {}/{} (exact so far: {}); behind {}; gaps {}, duplicates {}, mismatched {}, extra {}, no start {}; storm: {} resubscribed (last after {:.0} ms), {} live again (p50 {:.0} ms, last {:.0} ms); slow closes {}, other closes {}, eofs {}, errors {} ({:?}); hub {hub}",
        x.exact_clients, ours.got.len(), x.prefix_clients, x.behind, x.gaps, x.dups, x.mismatched, x.extra, x.no_start,
        st.subscribed, st.sub_max, st.live, st.first_p50, st.first_max, ours.sum(|g| g.slow_closes),
        ours.sum(|g| g.other_closes), ours.sum(|g| g.eofs), ours.sum(|g| g.errors),
        ours.got.iter().find_map(|g| g.first_error.clone())
    );
    if let Some(e) = &x.example {
        println!("  first mismatch: {e}");
    }
}

/// The group at each rate of `DUALSTREAM_BENCH_GW_RATES` (comma-separated; default 200, 1,000 and
/// 5,000 events/s; `DUALSTREAM_BENCH_GW_RATE` alone gives one), each on a topic and gateways of its
/// own, in that order.
pub(super) async fn run(brokers: &str, redis_url: &str, pids: &Pids, rows: &mut Vec<Row>) {
    let k = knobs();
    if !enough_open_files(&k) {
        return;
    }
    let rates: Vec<usize> =
        match (super::env_list("DUALSTREAM_BENCH_GW_RATES"), std::env::var("DUALSTREAM_BENCH_GW_RATE")) {
            (Some(list), _) => list,
            (_, Ok(_)) => vec![k.rate],
            _ => vec![200, 1_000, 5_000],
        };
    // Idle connections first (each row starts a gateway process of its own).
    let idle = knob("IDLE", 10_000);
    if idle > 0 {
        println!("  gateway group: {idle} idle SSE connections");
        super::idle::idle_rows(brokers, redis_url, idle, rows).await;
    }
    for rate in rates {
        println!("  gateway group at {rate} events/s");
        run_at(brokers, redis_url, pids, rows, Knobs { rate, ..k }).await;
    }
    if knob("NEIGHBOUR", 1) > 0 {
        println!("  gateway group: a neighbour resuming from offset 0 in a loop");
        neighbour::neighbour_rows(brokers, redis_url, pids, rows, k).await;
    }
}

async fn run_at(brokers: &str, redis_url: &str, pids: &Pids, rows: &mut Vec<Row>, k: Knobs) {
    let topic = unique_topic("bench-gw");
    create_topic(brokers, &topic, PARTITIONS).await;
    let client = redis::Client::open(redis_url).expect("redis url");
    let mut probe = Probe {
        ports: (port_of(redis_url), port_of(brokers.split(',').next().unwrap_or_default())),
        redis: client.get_multiplexed_async_connection().await.expect("redis"),
    };
    let setup = start(brokers, redis_url, &topic, Tweak::None).await;
    let sets = channel_sets(k.clients * 2, k.sources);
    let (ours, hub) = run_ours(&setup, &k, &sets, pids, &mut probe).await;
    let records = read_topic(brokers, &topic, ours.stored as usize + 1, Duration::from_secs(120));
    let x = exactness(&records, k.sources, &ours.got);
    let st = storm(&ours.got);
    print_ours(&ours, &setup.shared.hists, &x, &st, &hub);
    let (naive, naive_expected, naive_delivered) =
        run_naive(&setup, &k, &sets, pids, &mut probe, ours.subscribed).await;
    let shared = Arc::clone(&setup.shared);
    setup.stop().await;
    let report = Report {
        k,
        subscriptions: sets.iter().map(Vec::len).sum(),
        ours,
        naive,
        naive_expected,
        naive_delivered,
        x,
        st,
        hub,
    };
    report.latency_rows(&shared.hists, rows);
    report.load_rows(rows);
    report.exact_rows(rows);
}

/// What the rows are made of.
struct Report {
    k: Knobs,
    subscriptions: usize,
    ours: Run,
    naive: Run,
    naive_expected: u64,
    naive_delivered: u64,
    x: Exactness,
    st: Storm,
    hub: serde_json::Value,
}

/// A row of the group at `rate` events/s: `name` starts with "gateway:", which becomes "gateway at
/// `rate` ev/s:".
#[allow(clippy::too_many_arguments)]
fn row(
    rows: &mut Vec<Row>,
    rate: usize,
    name: &str,
    ours: f64,
    baseline: f64,
    unit: &'static str,
    goal: &str,
    met: Option<bool>,
    note: String,
) {
    rows.push(Row {
        group: "gateway",
        name: name.replacen("gateway:", &format!("gateway at {rate} ev/s:"), 1),
        ours,
        baseline,
        unit,
        goal: goal.into(),
        met,
        cpu: None,
        note,
    })
}

/// CPU in cores over a run's load.
fn cores(r: &Run) -> String {
    format!(
        "CPU in cores over the load: the gateway's process {:.2} and its librdkafka threads {:.2}, clients+ingest (the bench's process) {:.2}, tansu {}, redis-server {}",
        r.gw_cores, r.rdk_cores, r.client_cores,
        r.broker_cores.map_or("?".into(), |c| format!("{c:.2}")), r.redis_cores.map_or("?".into(), |c| format!("{c:.2}"))
    )
}

impl Report {
    /// The set-up, as the first row's note tells it.
    fn setup(&self) -> String {
        let k = &self.k;
        format!(
            "{} SSE + {} WebSocket clients, each on 1–10 of {} channels (seeded; {} subscriptions in all), half in mode=full; ingest {} events/s over HTTP ({} per POST every 10 ms) for {} s; both gateways in a process of their own (this binary again) on 2 runtime threads, the clients and ingest in the bench's process (stream limits per subject and per address raised: every client is subject \"bench\" on 127.0.0.1), tansu and redis-server on the same 2 cores; the gateway's replay.fetch_wait_max_ms = {} (tansu holds every fetch that long)",
            k.clients, k.clients, k.sources, self.subscriptions, k.rate, k.rate / 100, k.secs, fetch_wait_ms()
        )
    }

    /// Latency: notify clients against the naive gateway, and full-mode clients.
    fn latency_rows(&self, h: &[Hist], rows: &mut Vec<Row>) {
        let setup = self.setup();
        // The targets hold at 200 events/s (issue #22).
        let at_200 = self.k.rate == 200;
        let within = |ours: f64, bound: f64| at_200.then_some(ours <= bound);
        let goal = |g: &'static str| if at_200 { g } else { "-" };
        row(
            rows,
            self.k.rate,
            "gateway: ingest→client latency p50, notify clients vs naive (one Redis connection per client), ms",
            h[2].quantile(0.5),
            h[4].quantile(0.5),
            "ms",
            goal("≤ naive + 2 ms"),
            within(h[2].quantile(0.5), h[4].quantile(0.5) + 2.0),
            format!(
                "before the storm; send time = just before the POST, looked up by event id on receipt (100 µs buckets); {} samples, naive {}; {setup}",
                h[2].count(), h[4].count()
            ),
        );
        row(
            rows,
            self.k.rate,
            "gateway: ingest→client latency p99, notify clients vs naive, ms",
            h[2].quantile(0.99),
            h[4].quantile(0.99),
            "ms",
            goal("≤ naive + 5 ms"),
            within(h[2].quantile(0.99), h[4].quantile(0.99) + 5.0),
            format!(
                "as above; after the storm began: p50 {:.1} ms, p99 {:.1} ms",
                h[3].quantile(0.5),
                h[3].quantile(0.99)
            ),
        );
        row(
            rows,
            self.k.rate,
            "gateway: ingest→client latency p50 / p99, mode=full clients, ms",
            h[0].quantile(0.5),
            h[0].quantile(0.99),
            "ms",
            goal("p99 ≤ notify clients' p99 + 25 ms"),
            within(h[0].quantile(0.99), h[2].quantile(0.99) + 25.0),
            format!(
                "ours = p50, baseline column = p99 (send time in the payload); before the storm, {} samples; after it began p50 {:.1} ms, p99 {:.1} ms",
                h[0].count(), h[1].quantile(0.5), h[1].quantile(0.99)
            ),
        );
    }

    /// Deliveries, memory and connections, ours against the naive gateway.
    fn load_rows(&self, rows: &mut Vec<Row>) {
        let Report { ours, naive, naive_expected, naive_delivered, hub, .. } = self;
        let n = ours.got.len();
        row(
            rows,
            self.k.rate,
            "gateway: deliveries/s to all clients vs naive",
            ours.deliveries_per_s,
            naive.deliveries_per_s,
            "deliveries/s",
            if self.k.rate >= 1_000 { "≥ naive" } else { "-" },
            (self.k.rate >= 1_000).then_some(ours.deliveries_per_s >= naive.deliveries_per_s),
            format!(
                "over the load, storm included; {} events stored ({} failed POSTs), naive run {} stored ({} failed); naive delivered {naive_delivered} of the {naive_expected} its clients' channels carried; {}; naive run: {}",
                ours.stored, ours.ingest_errors, naive.stored, naive.ingest_errors, cores(ours), cores(naive)
            ),
        );
        row(
            rows,
            self.k.rate,
            "gateway: the gateway process's RSS growth under load (from its clients subscribed and idle) vs naive, MiB",
            (ours.rss_after as f64 - ours.rss_idle as f64) / 1024.0,
            (naive.rss_after as f64 - naive.rss_idle as f64) / 1024.0,
            "MiB",
            "≤ 100 MiB",
            Some((ours.rss_after as f64 - ours.rss_idle as f64) / 1024.0 <= 100.0),
            format!(
                "VmRSS of the gateways' process (its clients run in the bench's process; what idle connections cost is the idle row's): ours {} MiB before the clients, {} MiB with {} clients subscribed and idle, {} MiB at the end of the load; naive (the same process, after ours, whose memory the allocator keeps) {} → {} → {} MiB",
                ours.rss_before >> 10, ours.rss_idle >> 10, n, ours.rss_after >> 10,
                naive.rss_before >> 10, naive.rss_idle >> 10, naive.rss_after >> 10
            ),
        );
        // Core-µs of the gateways' process (its librdkafka threads too) per delivery.
        let per_delivery = |r: &Run| (r.gw_cores + r.rdk_cores) * 1e6 / r.deliveries_per_s.max(1.0);
        row(
            rows,
            self.k.rate,
            "gateway: CPU per delivery (the gateway's process: its runtime, librdkafka and ingest) vs naive, core-µs",
            per_delivery(ours),
            per_delivery(naive),
            "core-µs",
            "-",
            None,
            "the gateways' process's cores over the load (every thread: runtime, librdkafka, the ingest it serves) ÷ deliveries/s; the clients and the bench (another process), tansu and redis-server are not counted (see the deliveries row)".into(),
        );
        // The same with the servers' share: the naive gateway's fan-out is
        // redis-server's work (one connection per client), ours is in the
        // gateway; both runs ingest through the gateway into tansu.
        let with_servers = |r: &Run| {
            Some((r.gw_cores + r.rdk_cores + r.broker_cores? + r.redis_cores?) * 1e6 / r.deliveries_per_s.max(1.0))
        };
        if let (Some(o), Some(n)) = (with_servers(ours), with_servers(naive)) {
            row(
                rows,
                self.k.rate,
                "gateway: CPU per delivery with the servers' share (the gateway's process + tansu + redis-server) vs naive, core-µs",
                o,
                n,
                "core-µs",
                "-",
                None,
                "as the row above, adding tansu's and redis-server's cores over the load: the naive gateway's fan-out runs in redis-server (a connection per client), ours in the gateway; both runs ingest through the gateway into tansu".into(),
            );
        }
        row(
            rows,
            self.k.rate,
            "gateway: Redis connections held vs naive",
            ours.redis_conns as f64,
            naive.redis_conns as f64,
            "connections",
            "-",
            None,
            format!(
                "the gateways' process's established sockets to redis-server's port during the load (/proc/PID/fd × /proc/net/tcp); redis INFO connected_clients grew by {} (ours) and {} (naive); hub and the joins' live checks at the end: {hub}",
                ours.redis_info, naive.redis_info
            ),
        );
        row(
            rows,
            self.k.rate,
            "gateway: Kafka clients held (librdkafka instances)",
            ours.rdkafka_clients as f64,
            f64::NAN,
            "clients",
            "-",
            None,
            format!(
                "rdk:main threads of the process during the load (one per librdkafka client: the ingest producer, the metadata consumer, the shared readers); {} TCP connections to the broker; the naive gateway reads no Kafka",
                ours.kafka_conns
            ),
        );
    }

    /// Exactness against Kafka, and the reconnect storm.
    fn exact_rows(&self, rows: &mut Vec<Row>) {
        let Report { k, ours, x, st, .. } = self;
        let (n, exact_clients, prefix_clients, behind) = (ours.got.len(), x.exact_clients, x.prefix_clients, x.behind);
        let (gaps, dups, mismatched, extra, no_start) = (x.gaps, x.dups, x.mismatched, x.extra, x.no_start);
        row(
            rows,
            self.k.rate,
            "gateway: clients whose every channel got exactly Kafka's sequence",
            exact_clients as f64,
            n as f64,
            "clients",
            "all (ratio = 1)",
            Some(exact_clients == n),
            format!(
                "across the storm and any slow_client reconnects; checked against a plain rdkafka consumer's reading of the topic ({} records), from each channel's position in the client's first token; gaps {gaps}, duplicates/out of order {dups}, same count but other offsets {mismatched}, extra {extra}, channels without a start {no_start}; closes: slow_client {}, other {}, ends {}, connect errors {}{}; not checked for the naive gateway (it has no positions to resume from)",
                x.records, ours.sum(|g| g.slow_closes), ours.sum(|g| g.other_closes), ours.sum(|g| g.eofs), ours.sum(|g| g.errors),
                x.example.as_ref().map(|e| format!("; first mismatch: {e}")).unwrap_or_default()
            ),
        );
        row(
            rows,
            self.k.rate,
            "gateway: gaps + duplicates in what the clients received",
            (gaps + dups + mismatched) as f64,
            0.0,
            "deliveries",
            "0",
            Some(gaps + dups + mismatched == 0),
            format!(
                "a gap = an offset of the channel missing before the last one the client got; {prefix_clients} of {n} clients got an exact prefix of each channel's sequence; {behind} deliveries were still owed (the tail after each client's last offset) when the run stopped, after waiting until deliveries stopped growing for 2 s (at most 30 s)"
            ),
        );
        row(
            rows,
            self.k.rate,
            "gateway: reconnect storm, time until every client is subscribed again, ms",
            st.sub_max,
            f64::NAN,
            "ms",
            "-",
            None,
            format!(
                "at {} s of the load all {n} clients drop and resume (SSE: Last-Event-ID, WebSocket: subscribe with resume); {} of {n} resubscribed",
                k.storm_at, st.subscribed
            ),
        );
        row(
            rows,
            self.k.rate,
            "gateway: reconnect storm, time until every client has its first item after resuming, ms",
            st.first_max,
            st.first_p50,
            "ms",
            match k.rate {
                200 => "≤ 3,000 ms",
                5_000 => "≤ 10,000 ms",
                _ => "-",
            },
            match k.rate {
                200 => Some(st.first_max <= 3_000.0 && st.live == n),
                5_000 => Some(st.first_max <= 10_000.0 && st.live == n),
                _ => None,
            },
            format!(
                "ours = the last client, baseline column = the median client; {} of {n} got an item after resuming; resubscribed after {:.0} ms (median) to {:.0} ms (last); from its `subscribed` to its first item a client waited {:.0} ms (median) to {:.0} ms (longest); open again (SSE: the response's headers, sent once its subscribe is done; WebSocket: the handshake, before its subscribe) after {:.0} / {:.0} ms (SSE, median / last) and {:.0} / {:.0} ms (WebSocket); {}",
                st.live,
                st.sub_p50,
                st.sub_max,
                st.gap_p50,
                st.gap_max,
                st.open[0].0,
                st.open[0].1,
                st.open[1].0,
                st.open[1].1,
                self.ours.lag.map_or_else(String::new, |l| l.describe())
            ),
        );
    }
}
