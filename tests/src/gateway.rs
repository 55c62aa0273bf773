//! A gateway in the test process on the test stack, and small HTTP, SSE and
//! WebSocket clients for it.

use std::time::{Duration, Instant};

use dualstream_gateway::{AuthConfig, Claims, Gateway, GatewayConfig};
use futures::StreamExt;
use serde_json::Value;

use crate::{create_topic, kafka_brokers, redis_url, unique_topic};

/// The secret test gateways sign with.
pub const SECRET: &str = "test-secret-of-at-least-32-bytes-long";

/// A gateway serving on a free loopback port.
#[derive(Debug)]
pub struct TestGateway {
    /// The gateway (for `close_streams`, `auth`).
    pub gateway: Gateway,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Its topic (made for it, 3 partitions).
    pub topic: String,
    /// Its channel prefix (unique, so tests on one Redis do not meet).
    pub prefix: String,
    /// An HTTP client.
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl TestGateway {
    /// Start one; `tweak` adjusts the configuration first.
    pub async fn start(tweak: impl FnOnce(&mut GatewayConfig)) -> Self {
        let brokers = kafka_brokers();
        let topic = unique_topic("gw");
        create_topic(&brokers, &topic, 3).await;
        Self::start_on(brokers, topic, tweak).await
    }

    /// Start one on these brokers and this existing topic (a
    /// `MockCluster`'s, for example).
    pub async fn start_on(brokers: String, topic: String, tweak: impl FnOnce(&mut GatewayConfig)) -> Self {
        Self::start_with(brokers, topic, None, tweak).await
    }

    /// Start one serving `/metrics` from `metrics`, the Prometheus recorder
    /// the test installed.
    pub async fn start_with_metrics(
        metrics: metrics_exporter_prometheus::PrometheusHandle,
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> Self {
        let brokers = kafka_brokers();
        let topic = unique_topic("gw");
        create_topic(&brokers, &topic, 3).await;
        Self::start_with(brokers, topic, Some(metrics), tweak).await
    }

    async fn start_with(
        brokers: String,
        topic: String,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> Self {
        // The random end of a UUIDv7 (its start is the clock: tests starting in
        // the same millisecond would share it).
        let prefix = format!("gw{}", &dualstream::EventId::new().as_uuid().simple().to_string()[20..]);
        let mut config = GatewayConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            kafka_brokers: brokers,
            redis_url: redis_url(),
            topic: topic.clone(),
            auth: AuthConfig { secret: SECRET.into(), ..AuthConfig::default() },
            ..GatewayConfig::default()
        };
        config.redis.channel_prefix = prefix.clone();
        config.kafka.message_timeout_ms = 10_000;
        config.join.idle_check_ms = 200;
        tweak(&mut config);
        let gateway = Gateway::with_metrics(config, metrics).await.expect("gateway");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let g = gateway.clone();
        tokio::spawn(async move {
            let _ = g
                .serve(listener, async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Self { gateway, base, topic, prefix, http: reqwest::Client::new(), stop: Some(stop) }
    }

    /// The channel of a `user` source.
    pub fn channel(&self, id: &str) -> String {
        format!("{}:user:{id}", self.prefix)
    }

    /// A token reading `read` and publishing `publish`, valid for an hour.
    pub fn token(&self, read: &[&str], publish: &[&str]) -> String {
        let auth = self.gateway.auth();
        let claims = auth.claims(
            Some("test".into()),
            read.iter().map(|s| s.to_string()).collect(),
            publish.iter().map(|s| s.to_string()).collect(),
            3_600,
        );
        auth.mint(&claims).expect("mint")
    }

    /// A token with the `admin` claim (the dashboard and its feed,
    /// `/metrics`, the detail of `/readyz`), reading and publishing nothing.
    pub fn admin_token(&self) -> String {
        let auth = self.gateway.auth();
        let claims = Claims { admin: true, ..auth.claims(Some("admin".into()), Vec::new(), Vec::new(), 3_600) };
        auth.mint(&claims).expect("mint")
    }

    /// The gateway's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.base.trim_start_matches("http://").parse().expect("addr")
    }

    /// `GET /readyz` with the admin token: the whole document.
    pub async fn readyz(&self) -> Value {
        let r = self
            .http
            .get(format!("{}/readyz", self.base))
            .bearer_auth(self.admin_token())
            .send()
            .await
            .expect("readyz");
        r.json().await.expect("readyz json")
    }

    /// `POST /v1/tickets` with this token and request (`{"channels": [..]}`,
    /// `{"patterns": [..]}`, `{"dashboard": true}`); the status and reply.
    pub async fn ticket(&self, token: &str, request: &Value) -> (u16, Value) {
        self.post_json("/v1/tickets", token, request).await
    }

    /// A token from explicit claims.
    pub fn token_with(&self, claims: &Claims) -> String {
        self.gateway.auth().mint(claims).expect("mint")
    }

    /// `POST /v1/events` with a JSON body; the status and the JSON reply.
    pub async fn ingest(&self, token: &str, body: &Value) -> (u16, Value) {
        self.post_json("/v1/events", token, body).await
    }

    /// `POST {path}` with a bearer token and a JSON body; the status and the
    /// JSON reply.
    pub async fn post_json(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        let r =
            self.http.post(format!("{}{path}", self.base)).bearer_auth(token).json(body).send().await.expect("POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// A `user` event body for ingest.
pub fn user_event(id: &str, n: u64) -> Value {
    serde_json::json!({"type": "test.tick", "source_type": "user", "source_id": id, "payload": {"n": n}})
}

/// One server-sent event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// `event:`.
    pub event: String,
    /// `id:`.
    pub id: Option<String>,
    /// `data:` lines joined.
    pub data: String,
    /// `retry:`.
    pub retry: Option<u64>,
}

impl Frame {
    /// The data as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// An SSE connection.
pub struct Sse {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
    /// The status of the response.
    pub status: u16,
    /// The body when the status is not 200.
    pub error: Value,
}

impl std::fmt::Debug for Sse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sse").field("status", &self.status).field("buffered", &self.buf.len()).finish()
    }
}

impl Sse {
    /// `GET {url}` with these headers.
    pub async fn open(http: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Self {
        let mut req = http.get(url).header("accept", "text/event-stream");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.expect("stream request");
        let status = r.status().as_u16();
        if status != 200 {
            let error = r.json().await.unwrap_or(Value::Null);
            return Self { body: futures::stream::empty().boxed(), buf: Vec::new(), status, error };
        }
        Self { body: r.bytes_stream().boxed(), buf: Vec::new(), status, error: Value::Null }
    }

    /// The next frame, or `None` at the end of the stream or after
    /// `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&raw);
                let mut f = Frame::default();
                let mut data = Vec::new();
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        f.event = v.trim_start().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        f.id = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    } else if let Some(v) = line.strip_prefix("retry:") {
                        f.retry = v.trim().parse().ok();
                    }
                }
                if f.event.is_empty() && data.is_empty() {
                    continue; // a keep-alive comment
                }
                f.data = data.join("\n");
                return Some(f);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(Some(Err(_)) | None) | Err(_) => return None,
            }
        }
    }
}
