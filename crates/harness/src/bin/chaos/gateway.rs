//! Gateway clients under chaos: SSE and WebSocket clients, in notify and
//! full mode, of a `dualstream-gateway` process of the run's own (killed
//! with -9 and restarted as one of the faults). Each client subscribes to
//! a few channels, reads for 1–8 s, drops the connection without a word,
//! and comes back with the last resume token it was given, until the run
//! ends. Its log holds, per channel, every item in the order it arrived
//! across all its connections: the checker holds that to the channel's
//! Kafka sequence from the offset the first token named, with no gap, no
//! duplicate and the same events.
//!
//! Items and tokens are read with this module's own parsing, from
//! docs/gateway.md, sharing no code with the gateway.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::{checker, wire, PREFIX};

/// How a client reaches the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    Sse,
    Ws,
}

/// One channel of one client, across all its connections.
#[derive(Debug, Default)]
pub(crate) struct ChannelLog {
    pub(crate) source: usize,
    /// The next offset the first token that named the channel gave: its
    /// sequence starts there.
    pub(crate) start: Option<i64>,
    /// When that token arrived (ms since the run began).
    pub(crate) ready_ms: Option<u32>,
    /// (offset, event id, digest of the whole event in full mode).
    pub(crate) got: Vec<(i64, u128, Option<u32>)>,
    /// When each of `got` arrived (ms since the run began).
    pub(crate) got_ms: Vec<u32>,
    /// Items the checker could not read.
    pub(crate) unreadable: Vec<String>,
}

/// One client's log.
#[derive(Debug)]
pub(crate) struct GatewayLog {
    pub(crate) client: usize,
    pub(crate) transport: Transport,
    pub(crate) full: bool,
    pub(crate) channels: Vec<ChannelLog>,
    pub(crate) connections: u32,
    /// (ms since the run began, what): refused connections, streams that
    /// broke or ended, `error` items.
    pub(crate) errors: Vec<(u32, String)>,
    /// `reset` items (ms, the item): a client told it missed something.
    pub(crate) resets: Vec<(u32, String)>,
    /// Connections the gateway closed as a slow client.
    pub(crate) slow_closes: u32,
    /// When its last connection ended.
    pub(crate) end_ms: u32,
    /// Each connection: when it began, its first item (if any), when it
    /// ended, and how many items it carried.
    pub(crate) sessions: Vec<Session>,
    /// After the run: when the final connection began, and when every
    /// channel had reached its source's last acknowledged offset.
    pub(crate) final_began_ms: u32,
    pub(crate) caught_up_ms: Option<u32>,
}

/// How long a client may take, after the run, to deliver every
/// acknowledged event of its channels.
pub(crate) const CATCH_UP_BOUND: Duration = Duration::from_secs(60);

/// One connection of a client.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Session {
    pub(crate) began_ms: u32,
    pub(crate) first_item_ms: Option<u32>,
    pub(crate) ended_ms: u32,
    pub(crate) items: u32,
}

/// A client's state between connections.
struct Client {
    names: Vec<String>,
    /// The CRC-32 of each channel's name, as the resume token writes it.
    crcs: Vec<String>,
    full: bool,
    resume: Option<String>,
    log: GatewayLog,
    started: Instant,
    /// In the final connection: each channel's last acknowledged offset.
    targets: Option<Vec<Option<i64>>>,
}

/// How one connection ended, when it was not the client's own choice.
enum Ended {
    /// The client's time was up: it drops the connection.
    Ours,
    /// The gateway closed it as a slow client.
    Slow,
    /// Anything else.
    Error(String),
}

impl Client {
    fn ms(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    /// A resume token's entry for each channel: `r1.<log>.<crc>-<partition>-<next>_...`.
    fn token_offsets(&self, token: &str) -> Result<Vec<Option<i64>>, String> {
        let mut parts = token.splitn(3, '.');
        let (Some("r1"), Some(_log), Some(entries)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("resume token {token:?} is not r1.<log>.<entries>"));
        };
        let mut found = vec![None; self.names.len()];
        for entry in entries.split('_').filter(|e| !e.is_empty()) {
            let f: Vec<&str> = entry.split('-').collect();
            let [crc, _partition, next] = f[..] else {
                return Err(format!("resume token entry {entry:?}"));
            };
            let next: i64 = next.parse().map_err(|e| format!("resume token entry {entry:?}: {e}"))?;
            if let Some(i) = self.crcs.iter().position(|c| c == crc) {
                found[i] = Some(next);
            }
        }
        Ok(found)
    }

    /// A `subscribed` answer: each channel's sequence starts at the first
    /// token that names it.
    fn subscribed(&mut self, token: Option<&str>) -> Result<(), String> {
        let token = token.ok_or("a subscribed answer without a token")?;
        let offsets = self.token_offsets(token)?;
        let now = self.ms();
        for (c, next) in self.log.channels.iter_mut().zip(offsets) {
            if c.start.is_none() {
                c.start = next;
                c.ready_ms = next.map(|_| now);
            }
        }
        self.resume = Some(token.to_owned());
        Ok(())
    }

    /// One item or control message (its JSON; the token that came with
    /// it). Returns how the connection ends, if it does.
    fn handle(&mut self, v: &Value, token: Option<&str>) -> Option<Ended> {
        let now = self.ms();
        match v["kind"].as_str() {
            Some("subscribed") => self.subscribed(token).err().map(Ended::Error),
            Some("event") => {
                let channel = v["channel"].as_str().unwrap_or_default();
                let Some(i) = self.names.iter().position(|n| n == channel) else {
                    self.log.errors.push((now, format!("an item of a channel not subscribed: {v}")));
                    return None;
                };
                if let Some(s) = self.log.sessions.last_mut() {
                    s.items += 1;
                    s.first_item_ms.get_or_insert(now);
                }
                match self.read_item(v) {
                    Ok(got) if self.log.channels[i].start.is_some() => {
                        self.log.channels[i].got.push(got);
                        self.log.channels[i].got_ms.push(now);
                    }
                    Ok(_) => self.log.channels[i].unreadable.push(format!("an item before the channel's first token: {v}")),
                    Err(e) => self.log.channels[i].unreadable.push(format!("{e}: {v}")),
                }
                match token {
                    Some(t) => self.resume = Some(t.to_owned()),
                    None => self.log.channels[i].unreadable.push(format!("an item without a resume token: {v}")),
                }
                if self.caught_up() {
                    self.log.caught_up_ms = Some(now);
                    return Some(Ended::Ours);
                }
                None
            }
            Some("reset") => {
                self.log.resets.push((now, v.to_string()));
                if let Some(t) = token {
                    self.resume = Some(t.to_owned());
                }
                None
            }
            Some("close") if v["reason"] == "slow_client" => Some(Ended::Slow),
            Some("error" | "close") => Some(Ended::Error(v.to_string())),
            _ => Some(Ended::Error(format!("an unknown message: {v}"))),
        }
    }

    /// Whether, in the final connection, every channel has delivered its
    /// source's last acknowledged offset.
    fn caught_up(&self) -> bool {
        let Some(targets) = &self.targets else { return false };
        self.log.channels.iter().zip(targets).all(|(c, t)| match t {
            None => true,
            Some(t) => c.got.last().is_some_and(|g| g.0 >= *t),
        })
    }

    /// An item's position, id and (full mode) the digest of its event.
    fn read_item(&self, v: &Value) -> Result<(i64, u128, Option<u32>), String> {
        let p = &v["position"];
        if p["topic"] != super::TOPIC || p["partition"].as_i64().is_none() {
            return Err("no position in the topic".to_owned());
        }
        let offset = p["offset"].as_i64().ok_or("a position without an offset")?;
        let id = wire::parse_uuid7(v["id"].as_str().ok_or("no id")?)?;
        if !self.full {
            return Ok((offset, id, None));
        }
        let text = |k: &str| v[k].as_str().ok_or_else(|| format!("no {k}"));
        let payload = serde_json::to_vec(v.get("payload").ok_or("a full item without a JSON payload")?)
            .map_err(|e| e.to_string())?;
        let headers: BTreeMap<String, String> = match v.get("headers") {
            None => BTreeMap::new(),
            Some(h) => h
                .as_object()
                .ok_or("headers not an object")?
                .iter()
                .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())).ok_or("a header value not a string"))
                .collect::<Result<_, _>>()?,
        };
        let digest = wire::digest(
            id,
            text("type")?,
            text("source_type")?,
            text("source_id")?,
            v["occurred_at_ms"].as_u64().ok_or("no occurred_at_ms")?,
            &payload,
            &headers,
        );
        Ok((offset, id, Some(digest)))
    }

    fn mode(&self) -> &'static str {
        if self.full {
            "full"
        } else {
            "notify"
        }
    }

    /// One connection until `until`, logged as a session; errors are
    /// logged with `context` first. Returns false when it ended in an error.
    async fn connection(
        &mut self,
        transport: Transport,
        http: &reqwest::Client,
        base: &str,
        jwt: &str,
        until: tokio::time::Instant,
        context: &str,
    ) -> bool {
        self.log.connections += 1;
        let began_ms = self.ms();
        self.log.sessions.push(Session { began_ms, ..Session::default() });
        let ended = match transport {
            Transport::Sse => self.sse(http, base, jwt, until).await,
            Transport::Ws => self.ws(base, jwt, until).await,
        };
        self.log.end_ms = self.ms();
        if let Some(s) = self.log.sessions.last_mut() {
            s.ended_ms = self.log.end_ms;
        }
        match ended {
            Ended::Ours => true,
            Ended::Slow => {
                self.log.slow_closes += 1;
                true
            }
            Ended::Error(e) => {
                self.log.errors.push((self.log.end_ms, format!("{context}{e}")));
                false
            }
        }
    }

    /// `GET /v1/stream`, with `Last-Event-ID` when resuming, read until
    /// `until`.
    async fn sse(&mut self, http: &reqwest::Client, base: &str, jwt: &str, until: tokio::time::Instant) -> Ended {
        let query = {
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.append_pair("mode", self.mode());
            for n in &self.names {
                q.append_pair("channel", n);
            }
            q.finish()
        };
        let mut req = http.get(format!("{base}/v1/stream?{query}")).bearer_auth(jwt);
        if let Some(r) = &self.resume {
            req = req.header("last-event-id", r);
        }
        let resp = match tokio::time::timeout(Duration::from_secs(10), req.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Ended::Error(format!("connect: {e}")),
            Err(_) => return Ended::Error("no answer within 10 s".to_owned()),
        };
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            return Ended::Error(format!("status {status}: {body}"));
        }
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        loop {
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = buf.drain(..end + 2).collect();
                let (mut id, mut data) = (None, Vec::new());
                for line in String::from_utf8_lossy(&frame).lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    }
                }
                if data.is_empty() {
                    continue; // a comment (keep-alive) or `retry:` alone
                }
                let v: Value = match serde_json::from_str(&data.join("\n")) {
                    Ok(v) => v,
                    Err(e) => return Ended::Error(format!("an SSE data line that is not JSON ({e})")),
                };
                if let Some(end) = self.handle(&v, id.as_deref()) {
                    return end;
                }
            }
            match tokio::time::timeout_at(until, body.next()).await {
                Err(_) => return Ended::Ours,
                Ok(Some(Ok(chunk))) => buf.extend_from_slice(&chunk),
                Ok(Some(Err(e))) => return Ended::Error(format!("the stream broke: {e}")),
                Ok(None) => return Ended::Error("the stream ended".to_owned()),
            }
        }
    }

    /// `GET /v1/ws` and a `subscribe` command with the resume token, read
    /// until `until`.
    async fn ws(&mut self, base: &str, jwt: &str, until: tokio::time::Instant) -> Ended {
        let url = format!("{}/v1/ws", base.replacen("http://", "ws://", 1));
        let mut req = match url.into_client_request() {
            Ok(r) => r,
            Err(e) => return Ended::Error(format!("request: {e}")),
        };
        let Ok(auth) = format!("Bearer {jwt}").parse() else {
            return Ended::Error("the token is not a header value".to_owned());
        };
        req.headers_mut().insert("authorization", auth);
        let mut ws = match tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(req)).await {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => return Ended::Error(format!("connect: {e}")),
            Err(_) => return Ended::Error("no answer within 10 s".to_owned()),
        };
        let mut command = serde_json::json!({"op": "subscribe", "channels": self.names, "mode": self.mode()});
        if let Some(r) = &self.resume {
            command["resume"] = Value::from(r.as_str());
        }
        if let Err(e) = ws.send(Message::Text(command.to_string().into())).await {
            return Ended::Error(format!("send: {e}"));
        }
        loop {
            match tokio::time::timeout_at(until, ws.next()).await {
                Err(_) => return Ended::Ours,
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = match serde_json::from_str(&t) {
                        Ok(v) => v,
                        Err(e) => return Ended::Error(format!("a frame that is not JSON ({e})")),
                    };
                    let token = v["token"].as_str().map(str::to_owned);
                    if let Some(end) = self.handle(&v, token.as_deref()) {
                        return end;
                    }
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return match frame {
                        Some(f) if u16::from(f.code) == 4008 => Ended::Slow,
                        other => Ended::Error(format!("closed: {other:?}")),
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Ended::Error(format!("the socket broke: {e}")),
                Ok(None) => return Ended::Error("the socket ended".to_owned()),
            }
        }
    }
}

/// What a client is.
pub(crate) struct Spec {
    pub(crate) client: usize,
    pub(crate) transport: Transport,
    pub(crate) full: bool,
    pub(crate) sources: Vec<usize>,
}

/// Each source's last acknowledged offset, sent when the publishers have
/// stopped.
pub(crate) type Targets = tokio::sync::watch::Receiver<Option<Arc<std::collections::HashMap<usize, i64>>>>;

/// A client: connect, read for 1–8 s, drop, wait up to 1 s, resume with the
/// last token, until `stop`. Then, once the targets come, one final
/// connection (again after an error) until every channel has delivered its
/// source's last acknowledged offset, or `CATCH_UP_BOUND` has passed.
pub(crate) async fn client(
    base: String,
    jwt: String,
    spec: Spec,
    stop: Arc<AtomicBool>,
    mut targets: Targets,
    seed: u64,
    started: Instant,
) -> GatewayLog {
    let mut rng = StdRng::seed_from_u64(seed);
    let names: Vec<String> =
        spec.sources.iter().map(|s| wire::channel(PREFIX, checker::SOURCE_TYPE, &format!("s{s}"))).collect();
    let crcs = names.iter().map(|n| format!("{:08x}", crc32fast::hash(n.as_bytes()))).collect();
    let channels = spec.sources.iter().map(|s| ChannelLog { source: *s, ..ChannelLog::default() }).collect();
    let mut c = Client {
        names,
        crcs,
        full: spec.full,
        resume: None,
        log: GatewayLog {
            client: spec.client,
            transport: spec.transport,
            full: spec.full,
            channels,
            connections: 0,
            errors: Vec::new(),
            resets: Vec::new(),
            slow_closes: 0,
            end_ms: 0,
            sessions: Vec::new(),
            final_began_ms: 0,
            caught_up_ms: None,
        },
        started,
        targets: None,
    };
    let http = reqwest::Client::new();
    while !stop.load(Ordering::Relaxed) {
        let until = tokio::time::Instant::now() + Duration::from_millis(rng.random_range(1_000..8_000));
        c.connection(spec.transport, &http, &base, &jwt, until, "").await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1_000))).await;
    }
    let Ok(t) = targets.wait_for(Option::is_some).await.map(|t| t.clone().unwrap_or_default()) else {
        return c.log;
    };
    c.targets = Some(spec.sources.iter().map(|s| t.get(s).copied()).collect());
    c.log.final_began_ms = c.ms();
    let deadline = tokio::time::Instant::now() + CATCH_UP_BOUND;
    if c.caught_up() {
        c.log.caught_up_ms = Some(c.ms());
    }
    while c.log.caught_up_ms.is_none() && tokio::time::Instant::now() < deadline {
        if !c.connection(spec.transport, &http, &base, &jwt, deadline, "after the run: ").await {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    c.log
}
