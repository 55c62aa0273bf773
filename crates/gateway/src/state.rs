//! What every request handler shares ([`AppState`]), the counting of open
//! streams against the limits ([`ClientGuard`]) and the last health check
//! ([`Health`]).

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use dualstream_batch::BatchEngine;
use dualstream_channel::ChannelNamer;
use dualstream_consumer::{CatchUp, Hub};
use dualstream_redis::RedisNotifier;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::auth::Auth;
use crate::config::GatewayConfig;
use crate::limits::{FarPace, FarResumes, LimitError, StreamCounts};
use crate::wire::Ingested;

/// Shared by every handler.
pub(crate) struct AppState {
    /// The resolved configuration.
    pub(crate) config: GatewayConfig,
    /// Channel names.
    pub(crate) namer: ChannelNamer,
    /// Ingest goes through it.
    pub(crate) engine: BatchEngine,
    /// The notifier, for its breaker state.
    pub(crate) notifier: RedisNotifier,
    /// Live subscriptions.
    pub(crate) hub: Hub,
    /// Resumable subscriptions.
    pub(crate) catchup: CatchUp,
    /// Verifies and mints the signed tokens (JWTs) and tickets.
    pub(crate) auth: Auth,
    /// The hash of the event log's identity, in resume tokens.
    pub(crate) log_hash: u32,
    /// Whether the hub takes patterns (not on a Redis Cluster).
    pub(crate) hub_patterns: bool,
    /// Set to true when the gateway shuts down.
    pub(crate) shutdown: watch::Sender<bool>,
    /// Open SSE streams.
    pub(crate) sse_clients: AtomicUsize,
    /// Open WebSocket connections.
    pub(crate) ws_clients: AtomicUsize,
    /// Bytes of items waiting in the clients' buffers, all together.
    pub(crate) buffered_bytes: Arc<AtomicUsize>,
    /// `/metrics`, when a Prometheus recorder is installed.
    pub(crate) metrics: Option<PrometheusHandle>,
    /// What the dashboard shows.
    pub(crate) dashboard: Mutex<DashboardData>,
    /// Open streams per subject and address.
    pub(crate) streams: Mutex<StreamCounts>,
    /// Far resumes per token subject (`limits.far_resumes_per_min`).
    pub(crate) far_resumes: Mutex<FarResumes>,
    /// The pace of far history per token subject
    /// (`limits.far_items_per_sec`).
    pub(crate) far_pace: Mutex<FarPace>,
    /// Items rendered once for every subscriber of their channel.
    pub(crate) renders: crate::renders::Renders,
    /// The last Kafka and Redis health check and when it was made: checked
    /// at most once a second, however many ask.
    pub(crate) health: tokio::sync::Mutex<Option<(tokio::time::Instant, Health)>>,
    /// How many times Kafka and Redis were checked.
    pub(crate) health_checks: std::sync::atomic::AtomicU64,
    /// Far-resume items that waited for their subject's
    /// `limits.far_items_per_sec`.
    pub(crate) far_items_paced: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Kafka's and Redis's health, as last checked (`routes/health.rs`).
#[derive(Clone, Debug)]
pub(crate) struct Health {
    /// Kafka's answer.
    pub(crate) kafka: Result<(), String>,
    /// Redis's answer, when there is a notifier to ask.
    pub(crate) redis: Option<Result<(), String>>,
}

/// Which transport a client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    /// Server-sent events.
    Sse,
    /// WebSocket.
    Ws,
}

/// Counts a client while it is connected, against the stream limits.
#[derive(Debug)]
pub(crate) struct ClientGuard {
    state: Arc<AppState>,
    transport: Transport,
    subject: String,
    address: Option<IpAddr>,
}

impl ClientGuard {
    /// Count one client of this transport, for this token subject and
    /// client address, unless a limit is reached.
    pub(crate) fn acquire(
        state: &Arc<AppState>,
        transport: Transport,
        subject: &str,
        address: Option<IpAddr>,
    ) -> Result<Self, LimitError> {
        state.streams.lock().unwrap_or_else(PoisonError::into_inner).acquire(&state.config.limits, subject, address)?;
        state.clients(transport).fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(crate::metric_names::CLIENTS, "transport" => transport.name()).increment(1.0);
        Ok(Self { state: Arc::clone(state), transport, subject: subject.to_owned(), address })
    }
}

impl ClientGuard {
    /// The token subject the client is counted under.
    pub(crate) fn subject(&self) -> &str {
        &self.subject
    }

    /// The transport's name, as the metrics label it: `sse` or `ws`.
    pub(crate) fn transport(&self) -> &'static str {
        self.transport.name()
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.state.streams.lock().unwrap_or_else(PoisonError::into_inner).release(&self.subject, self.address);
        self.state.clients(self.transport).fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(crate::metric_names::CLIENTS, "transport" => self.transport.name()).decrement(1.0);
    }
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
        }
    }
}

impl AppState {
    fn clients(&self, t: Transport) -> &AtomicUsize {
        match t {
            Transport::Sse => &self.sse_clients,
            Transport::Ws => &self.ws_clients,
        }
    }

    /// Record what ingest stored, for the dashboard.
    pub(crate) fn record_ingested(&self, stored: Ingested) {
        let mut d = self.dashboard.lock().unwrap_or_else(PoisonError::into_inner);
        *d.counts.entry(stored.source_type.clone()).or_default() += 1;
        d.latest.push_front(stored);
        d.latest.truncate(DashboardData::LATEST);
    }
}

/// Counters behind the dashboard.
#[derive(Debug, Default)]
pub(crate) struct DashboardData {
    /// Events stored through this gateway since it started, per source type.
    pub(crate) counts: BTreeMap<String, u64>,
    /// The latest events stored through this gateway, newest first.
    pub(crate) latest: VecDeque<Ingested>,
}

impl DashboardData {
    /// How many latest events are kept.
    pub(crate) const LATEST: usize = 20;
}
