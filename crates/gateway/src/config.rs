//! The gateway's configuration: its own settings, and those of the crates it
//! is built on, in one serde document (TOML in the binary).

use std::net::SocketAddr;

use dualstream_batch::BatchConfig;
use dualstream_consumer::{HubConfig, JoinConfig, ReplayConfig};
use dualstream_core::{check_range, FieldError};
use dualstream_kafka::KafkaSinkConfig;
use dualstream_redis::RedisNotifierConfig;
use serde::{Deserialize, Serialize};

/// Why a configuration cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field has a bad value.
    #[error("gateway config: {field}: {reason}")]
    Invalid {
        /// The field, as a path (`auth.secret`).
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The configuration file could not be read or parsed.
    #[error("gateway config file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong (TOML errors name the line and the key).
        reason: String,
    },
    /// A configuration of a crate the gateway is built on.
    #[error("gateway config: {section}: {reason}")]
    Section {
        /// `kafka`, `redis`, `batch`, `replay`, `hub` or `join`.
        section: &'static str,
        /// The crate's own error, which names the field.
        reason: String,
    },
}

impl From<FieldError> for ConfigError {
    fn from(e: FieldError) -> Self {
        Self::Invalid { field: e.field, reason: e.reason }
    }
}

/// Everything a gateway needs.
///
/// `kafka_brokers`, `redis_url` and `topic` are set once here and copied into
/// the sections of the crates below, so that ingest and delivery cannot point
/// at different services.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address to listen on. Default: `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Kafka bootstrap servers. Default: `127.0.0.1:9092`.
    pub kafka_brokers: String,
    /// Redis URL. Default: `redis://127.0.0.1:6379`.
    pub redis_url: String,
    /// The topic every event goes to. Default: `events`.
    pub topic: String,
    /// Names the event log that resume tokens point into. A token minted
    /// under another `stream_id` resumes nothing: its channels get a `reset`.
    /// Change it when the topic is deleted and created again, or the gateway
    /// moves to another cluster. Default: `default`.
    pub stream_id: String,
    /// Authentication and authorisation.
    pub auth: AuthConfig,
    /// Limits on what clients send and hold.
    pub limits: GatewayLimits,
    /// Origins (`https://app.example.com`, scheme, host and port only) that
    /// may open a WebSocket or send a cookie-authenticated request, besides
    /// the gateway's own origin (the request's `Host`), which is always
    /// allowed. Browsers send `Origin`; another site's page cannot forge it.
    /// Default: none (same origin only).
    pub allowed_origins: Vec<String>,
    /// Serve the live dashboard at `/` and its feed at `/v1/dashboard`. The
    /// page is static; the feed needs a token with the `admin` claim (or a
    /// ticket made from one). Default: true.
    pub dashboard: bool,
    /// The Kafka sink (its `bootstrap_servers` and `topic` are overwritten).
    pub kafka: KafkaSinkConfig,
    /// The Redis notifier (its `url` is overwritten).
    pub redis: RedisNotifierConfig,
    /// The batching engine that ingest goes through.
    pub batch: BatchConfig,
    /// The Kafka reader of the delivery side (`bootstrap_servers` and
    /// `topic` are overwritten).
    pub replay: ReplayConfig,
    /// The hub (its `url` is overwritten).
    pub hub: HubConfig,
    /// The catch-up joins.
    pub join: JoinConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            kafka_brokers: "127.0.0.1:9092".to_owned(),
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            topic: "events".to_owned(),
            stream_id: "default".to_owned(),
            auth: AuthConfig::default(),
            limits: GatewayLimits::default(),
            allowed_origins: Vec::new(),
            dashboard: true,
            kafka: KafkaSinkConfig::default(),
            redis: RedisNotifierConfig::default(),
            batch: BatchConfig::default(),
            replay: ReplayConfig::default(),
            hub: HubConfig::default(),
            join: JoinConfig::default(),
        }
    }
}

/// Signed tokens (JWT, HS256).
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The HS256 secret, at least 32 bytes. No default: a gateway without
    /// one refuses to start.
    pub secret: String,
    /// The `iss` every token must carry. Default: `dualstream`.
    pub issuer: String,
    /// The `aud` every token must carry. Default: `dualstream-gateway`.
    pub audience: String,
    /// Lifetime of a ticket from `POST /v1/tickets`, in seconds: long
    /// enough to open a stream with it. Default: 30.
    pub ticket_ttl_secs: u64,
    /// Clock skew allowed on `exp` and `nbf`, in seconds. Default: 5.
    pub leeway_secs: u64,
    /// The cookie a browser's `EventSource` sends the token in. Default:
    /// `dualstream_token`.
    pub cookie: String,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ticket_ttl_secs", &self.ticket_ttl_secs)
            .field("leeway_secs", &self.leeway_secs)
            .field("cookie", &self.cookie)
            .finish()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            secret: String::new(),
            issuer: "dualstream".to_owned(),
            audience: "dualstream-gateway".to_owned(),
            ticket_ttl_secs: 30,
            leeway_secs: 5,
            cookie: "dualstream_token".to_owned(),
        }
    }
}

/// Limits on requests and connections.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayLimits {
    /// Largest ingest body, in bytes; larger gets 413. Default: 1 MiB.
    pub max_body_bytes: usize,
    /// Most events in one ingest request; more gets 413. Default: 1,000.
    pub max_events_per_request: usize,
    /// Events that one client's channel subscriptions may read from Kafka
    /// ahead of it, in all (items are rendered only when they go out; live
    /// notifications are shared and bounded by `join.buffer`). Default:
    /// 128: twice what a WebSocket connection writes in one go; past that,
    /// read-ahead only holds memory (at 5,000 events/s with 2,000 clients
    /// behind, 1,024 held about 600,000 events).
    pub client_buffer: usize,
    /// Bytes of events that one client's channel subscriptions may read
    /// ahead of it, in all, beside `client_buffer`: a client that does not
    /// read holds at most this much of the gateway's memory in events,
    /// whatever their size. One event larger than it is still read, alone.
    /// Default: 4 MiB.
    pub client_buffer_bytes: usize,
    /// Most channels and patterns one connection may subscribe to.
    /// Default: 64.
    pub max_subscriptions: usize,
    /// How long a WebSocket send may wait, in milliseconds, before the
    /// client counts as too slow and is closed with the reason
    /// `slow_client`; a write to any connection (SSE too) that waits twice
    /// this (at least 10 s) drops the connection. A client that reads, however
    /// slowly, is not closed: it falls behind and catches up from Kafka.
    /// Default: 5,000.
    pub send_timeout_ms: u64,
    /// SSE `retry:` sent with every close (slow client, expired token,
    /// shutdown), in milliseconds. Default: 2,000.
    pub sse_retry_ms: u64,
    /// Interval between SSE keep-alive comments, in milliseconds. Default:
    /// 15,000.
    pub keep_alive_ms: u64,
    /// Open TCP connections, in all; more are answered 503
    /// `too_many_connections` (with `Retry-After`) and closed. Default:
    /// 10,000.
    pub max_connections: usize,
    /// Open streams (SSE and WebSocket), in all; more get 503
    /// `too_many_streams` with `Retry-After`. Default: 5,000.
    pub max_streams: usize,
    /// Open streams per token subject (`sub`; tokens without one share the
    /// subject `""`); more get 429 `too_many_streams`. Default: 16.
    pub max_streams_per_subject: usize,
    /// Open streams per client address; more get 429 `too_many_streams`.
    /// Default: 32.
    pub max_streams_per_address: usize,
    /// WebSocket commands (`subscribe`, `unsubscribe`) per second per
    /// connection, with a burst of as many; more are answered with an error
    /// `rate_limited` and not run. Default: 10.
    pub commands_per_sec: u32,
    /// Far resumes per token subject per minute (a bucket of this many,
    /// refilled evenly): channel subscriptions resuming further behind their
    /// partition's end than `join.cache_records`, which the tail cache
    /// cannot serve. Each sends the backfill readers to Kafka and the client
    /// everything in between; more get 429 (SSE) or an error item (WebSocket)
    /// `rate_limited` with `Retry-After`, and none of the request's
    /// subscriptions start. Resumes near the end and new subscriptions are
    /// not counted. Default: 120 (a connection's 64 subscriptions at once,
    /// and about one far resume a second after that).
    pub far_resumes_per_min: u32,
    /// Items a token subject is sent per second from its far resumes (a
    /// bucket of a second's worth per subject, shared by all its streams and
    /// channels, so reconnecting does not refill it): the history of
    /// channels that resumed further back than `join.cache_records`, up to
    /// where their partition ended when they subscribed; and what a client
    /// that fell further behind than `join.cache_records` (it read slowly)
    /// catches up on from Kafka. Other items after that point, live items
    /// and resumes near the end are never paced. Without
    /// it, one client resuming from far back in a loop had its whole history
    /// sent as fast as its connection took it, and every other client's live
    /// items waited behind it. Default: 1,000.
    pub far_items_per_sec: u32,
    /// How long a client may take to send a request's headers, in
    /// milliseconds, counted from when the connection opens or its previous
    /// response ended: a connection that sends no complete request within it
    /// is closed (slowloris, idle keep-alive). Default: 10,000.
    pub header_read_timeout_ms: u64,
    /// The header a reverse proxy puts the client's address in
    /// (`x-forwarded-for`: its last entry is used), for
    /// `max_streams_per_address`. Set it only behind a proxy that always
    /// sets it: a client can send any value. Default: none (the TCP peer).
    pub client_address_header: Option<String>,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_events_per_request: 1_000,
            client_buffer: 128,
            client_buffer_bytes: 4 << 20,
            max_subscriptions: 64,
            send_timeout_ms: 5_000,
            sse_retry_ms: 2_000,
            keep_alive_ms: 15_000,
            max_connections: 10_000,
            max_streams: 5_000,
            max_streams_per_subject: 16,
            max_streams_per_address: 32,
            commands_per_sec: 10,
            far_resumes_per_min: 120,
            far_items_per_sec: 1_000,
            header_read_timeout_ms: 10_000,
            client_address_header: None,
        }
    }
}

impl GatewayConfig {
    /// Read a TOML file; fields it leaves out keep their defaults.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let file = |reason: String| ConfigError::File { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
        toml::from_str(&text).map_err(|e| file(e.to_string()))
    }

    /// Copy the shared settings into the sections and check every field;
    /// the first problem found is returned.
    pub fn resolve(mut self) -> Result<Self, ConfigError> {
        if self.topic.is_empty() || self.topic.len() > 249 {
            return Err(ConfigError::Invalid { field: "topic", reason: "must be 1 to 249 bytes".into() });
        }
        let routing = dualstream_kafka::TopicRouting::Single { topic: self.topic.clone() };
        self.kafka.bootstrap_servers = self.kafka_brokers.clone();
        self.kafka.topic = routing.clone();
        self.replay.bootstrap_servers = self.kafka_brokers.clone();
        self.replay.topic = routing;
        self.redis.url = self.redis_url.clone();
        self.hub.url = self.redis_url.clone();
        self.hub.channel_prefix = self.redis.channel_prefix.clone();
        self.hub.cluster_urls = self.redis.cluster_urls.clone();
        if self.stream_id.is_empty() || self.stream_id.len() > 128 {
            return Err(ConfigError::Invalid { field: "stream_id", reason: "must be 1 to 128 bytes".into() });
        }
        if self.auth.secret.len() < 32 {
            return Err(ConfigError::Invalid {
                field: "auth.secret",
                reason: format!(
                    "is {} bytes; at least 32 are needed (set DUALSTREAM_GATEWAY_SECRET or auth.secret)",
                    self.auth.secret.len()
                ),
            });
        }
        for (field, v) in [("auth.issuer", &self.auth.issuer), ("auth.audience", &self.auth.audience)] {
            if v.is_empty() {
                return Err(ConfigError::Invalid { field, reason: "must not be empty".into() });
            }
        }
        let cookie_ok =
            |c: &str| !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !cookie_ok(&self.auth.cookie) {
            return Err(ConfigError::Invalid {
                field: "auth.cookie",
                reason: "must be ASCII letters, digits, '_' or '-'".into(),
            });
        }
        check_range("auth.ticket_ttl_secs", self.auth.ticket_ttl_secs, 1, 3_600)?;
        check_range("auth.leeway_secs", self.auth.leeway_secs, 0, 300)?;
        let l = &self.limits;
        check_range("limits.max_body_bytes", l.max_body_bytes as u64, 1_024, 1 << 30)?;
        check_range("limits.max_events_per_request", l.max_events_per_request as u64, 1, 1_000_000)?;
        check_range("limits.client_buffer", l.client_buffer as u64, 1, 1 << 20)?;
        check_range("limits.client_buffer_bytes", l.client_buffer_bytes as u64, 1_024, 1 << 30)?;
        check_range("limits.max_subscriptions", l.max_subscriptions as u64, 1, 10_000)?;
        check_range("limits.send_timeout_ms", l.send_timeout_ms, 1, 600_000)?;
        check_range("limits.sse_retry_ms", l.sse_retry_ms, 1, 3_600_000)?;
        check_range("limits.keep_alive_ms", l.keep_alive_ms, 100, 3_600_000)?;
        check_range("limits.max_connections", l.max_connections as u64, 1, 1_000_000)?;
        check_range("limits.max_streams", l.max_streams as u64, 1, 1_000_000)?;
        check_range("limits.max_streams_per_subject", l.max_streams_per_subject as u64, 1, 1_000_000)?;
        check_range("limits.max_streams_per_address", l.max_streams_per_address as u64, 1, 1_000_000)?;
        check_range("limits.commands_per_sec", u64::from(l.commands_per_sec), 1, 10_000)?;
        check_range("limits.far_resumes_per_min", u64::from(l.far_resumes_per_min), 1, 1_000_000)?;
        check_range("limits.far_items_per_sec", u64::from(l.far_items_per_sec), 1, 10_000_000)?;
        check_range("limits.header_read_timeout_ms", l.header_read_timeout_ms, 100, 600_000)?;
        if let Some(h) = &l.client_address_header {
            if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(ConfigError::Invalid {
                    field: "limits.client_address_header",
                    reason: format!("{h:?} is not a header name"),
                });
            }
        }
        for (i, o) in self.allowed_origins.iter().enumerate() {
            if let Err(reason) = crate::origin::parse_origin(o) {
                return Err(ConfigError::Invalid {
                    field: "allowed_origins",
                    reason: format!("[{i}] {o:?}: {reason}; write scheme://host[:port], as a browser's Origin header"),
                });
            }
        }
        let section = |section, reason: String| ConfigError::Section { section, reason };
        self.kafka.validate().map_err(|e| section("kafka", e.to_string()))?;
        self.redis.validate().map_err(|e| section("redis", e.to_string()))?;
        self.batch.validate().map_err(|e| section("batch", e.to_string()))?;
        self.replay.validate().map_err(|e| section("replay", e.to_string()))?;
        self.hub.validate().map_err(|e| section("hub", e.to_string()))?;
        self.join.validate().map_err(|e| section("join", e.to_string()))?;
        Ok(self)
    }
}
