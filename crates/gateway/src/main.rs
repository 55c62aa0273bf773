//! `dualstream-gateway`: HTTP ingest and SSE/WebSocket delivery.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dualstream_gateway::{Auth, Gateway, GatewayConfig};

/// HTTP ingest and SSE/WebSocket delivery for dualstream.
///
/// Settings come from the TOML file given with --config (every field of
/// GatewayConfig; see docs/gateway.md), then from the options and
/// environment variables below, which win.
#[derive(Debug, Parser)]
#[command(name = "dualstream-gateway", version, about, long_about)]
struct Args {
    /// A TOML configuration file.
    #[arg(long, env = "DUALSTREAM_GATEWAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "DUALSTREAM_GATEWAY_LISTEN", global = true)]
    listen: Option<std::net::SocketAddr>,
    /// Kafka bootstrap servers [default: 127.0.0.1:9092].
    #[arg(long, env = "KAFKA_BROKERS", global = true)]
    kafka_brokers: Option<String>,
    /// Redis URL [default: redis://127.0.0.1:6379].
    #[arg(long, env = "REDIS_URL", global = true)]
    redis_url: Option<String>,
    /// The Kafka topic [default: events].
    #[arg(long, env = "DUALSTREAM_TOPIC", global = true)]
    topic: Option<String>,
    /// The HS256 secret tokens are signed with (at least 32 bytes).
    #[arg(long, env = "DUALSTREAM_GATEWAY_SECRET", hide_env_values = true, global = true)]
    secret: Option<String>,
    /// The `iss` tokens must carry [default: dualstream].
    #[arg(long, env = "DUALSTREAM_GATEWAY_ISSUER", global = true)]
    issuer: Option<String>,
    /// The `aud` tokens must carry [default: dualstream-gateway].
    #[arg(long, env = "DUALSTREAM_GATEWAY_AUDIENCE", global = true)]
    audience: Option<String>,
    /// Names the event log resume tokens point into [default: default].
    #[arg(long, env = "DUALSTREAM_GATEWAY_STREAM_ID", global = true)]
    stream_id: Option<String>,
    /// Do not serve the dashboard at / (it needs an admin token in any case).
    #[arg(long, global = true)]
    no_dashboard: bool,
    /// An origin (https://app.example.com) allowed besides the gateway's own to open a WebSocket or use
    /// the cookie (repeat, or separate with commas).
    #[arg(long, env = "DUALSTREAM_GATEWAY_ALLOWED_ORIGINS", value_delimiter = ',', global = true)]
    allowed_origin: Vec<String>,
    /// Development only (`cargo xtask gateway`): run librdkafka's in-process mock cluster as the broker,
    /// with the topic created on it. The log lives in this process's memory and is gone when it exits.
    #[arg(long, hide = true)]
    mock_kafka: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Print the resolved configuration as TOML (the secret masked) and exit.
    Config,
    /// Sign a token with the configured secret and print it.
    Token(TokenArgs),
}

/// The claims of `token`.
#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// A channel or pattern the token may read (repeat).
    #[arg(long)]
    read: Vec<String>,
    /// A source type the token may publish, `*` for all (repeat).
    #[arg(long)]
    publish: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// The `sub` claim.
    #[arg(long)]
    sub: Option<String>,
    /// The `admin` claim: the dashboard, /metrics and the detail of /readyz.
    #[arg(long)]
    admin: bool,
}

fn config(args: &Args) -> Result<GatewayConfig, String> {
    let mut c = match &args.config {
        Some(path) => GatewayConfig::from_toml_file(path).map_err(|e| e.to_string())?,
        None => GatewayConfig::default(),
    };
    if let Some(v) = args.listen {
        c.listen = v;
    }
    if let Some(v) = &args.kafka_brokers {
        c.kafka_brokers = v.clone();
    }
    if let Some(v) = &args.redis_url {
        c.redis_url = v.clone();
    }
    if let Some(v) = &args.topic {
        c.topic = v.clone();
    }
    if let Some(v) = &args.secret {
        c.auth.secret = v.clone();
    }
    if let Some(v) = &args.issuer {
        c.auth.issuer = v.clone();
    }
    if let Some(v) = &args.audience {
        c.auth.audience = v.clone();
    }
    if let Some(v) = &args.stream_id {
        c.stream_id = v.clone();
    }
    if !args.allowed_origin.is_empty() {
        c.allowed_origins = args.allowed_origin.clone();
    }
    if args.no_dashboard {
        c.dashboard = false;
    }
    c.resolve().map_err(|e| e.to_string())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    // With the `otlp` feature and OTEL_EXPORTER_OTLP_ENDPOINT set, spans and metrics also go to that collector.
    #[cfg(feature = "otlp")]
    let (tracer, meter) = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            use dualstream_gateway::telemetry::{otlp_meter, otlp_tracer};
            let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "dualstream-gateway".into());
            let interval = match otlp_interval() {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("dualstream-gateway: {e}");
                    return ExitCode::from(2);
                }
            };
            match otlp_tracer(&endpoint, &service).and_then(|t| Ok((t, otlp_meter(&endpoint, &service, interval)?))) {
                Ok((tracer, meter)) => (Some(tracer), Some((meter, interval))),
                Err(e) => {
                    eprintln!("dualstream-gateway: OTEL_EXPORTER_OTLP_ENDPOINT: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        _ => (None, None),
    };
    #[cfg(not(feature = "otlp"))]
    let meter = None;
    #[cfg(feature = "otlp")]
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let spans = tracer.as_ref().map(dualstream_gateway::telemetry::layer);
        tracing_subscriber::registry()
            .with(filter())
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .with(spans)
            .init();
    }
    #[cfg(not(feature = "otlp"))]
    tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).init();
    let mut args = Args::parse();
    // The mock cluster lives as long as the process.
    let mock = match args.mock_kafka.then(|| rdkafka::mocking::MockCluster::new(1)).transpose() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("dualstream-gateway: librdkafka's mock cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(m) = &mock {
        args.kafka_brokers = Some(m.bootstrap_servers());
    }
    let config = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dualstream-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(m) = &mock {
        if let Err(e) = m.create_topic(&config.topic, 3, 1) {
            eprintln!("dualstream-gateway: topic {} on the mock cluster: {e}", config.topic);
            return ExitCode::FAILURE;
        }
        let brokers = &config.kafka_brokers;
        tracing::warn!(%brokers, "Kafka is librdkafka's in-process mock cluster: nothing is durable");
    }
    // Kept for the shutdown below; without `otlp` the meter is
    // `Option<Infallible>`, which is `Copy`.
    #[cfg_attr(not(feature = "otlp"), allow(clippy::clone_on_copy))]
    let serving = meter.clone();
    let code = match args.command.unwrap_or(Command::Serve) {
        Command::Config => print_config(&config),
        Command::Token(claims) => print_token(&config, claims),
        Command::Serve => serve(config, serving).await,
    };
    // The last batch of spans and metrics, sent before the process ends (off the runtime's threads: the
    // exporters' HTTP client blocks).
    #[cfg(feature = "otlp")]
    {
        if let Some(provider) = tracer {
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
        if let Some((provider, _)) = meter {
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
    code
}

/// `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds, 60,000 when unset), as
/// OpenTelemetry's SDKs read it.
#[cfg(feature = "otlp")]
fn otlp_interval() -> Result<std::time::Duration, String> {
    const MAX_MS: u64 = 3_600_000;
    match std::env::var("OTEL_METRIC_EXPORT_INTERVAL") {
        Err(_) => Ok(std::time::Duration::from_secs(60)),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if (1_000..=MAX_MS).contains(&ms) => Ok(std::time::Duration::from_millis(ms)),
            _ => Err(format!("OTEL_METRIC_EXPORT_INTERVAL={v:?}: milliseconds from 1000 to {MAX_MS}")),
        },
    }
}

/// The OTLP meter provider and its export interval, with the `otlp` feature.
#[cfg(feature = "otlp")]
type Meter = Option<(opentelemetry_sdk::metrics::SdkMeterProvider, std::time::Duration)>;
#[cfg(not(feature = "otlp"))]
type Meter = Option<std::convert::Infallible>;

/// The metrics recorder: Prometheus for `/metrics`, and with `meter` the
/// OTLP exporter beside it. `None` if a recorder is installed already.
fn install_recorder(meter: &Meter) -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = prometheus.handle();
    #[cfg(feature = "otlp")]
    let installed = match meter {
        Some((provider, _)) => {
            metrics::set_global_recorder(dualstream_gateway::telemetry::with_otlp(prometheus, provider))
                .map_err(|e| e.to_string())
        }
        None => metrics::set_global_recorder(prometheus).map_err(|e| e.to_string()),
    };
    #[cfg(not(feature = "otlp"))]
    let installed = {
        let _ = meter;
        metrics::set_global_recorder(prometheus).map_err(|e| e.to_string())
    };
    match installed {
        Ok(()) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "no /metrics: the metrics recorder could not be installed");
            None
        }
    }
}

/// `config`: the configuration as resolved, the secret hidden.
fn print_config(config: &GatewayConfig) -> ExitCode {
    let mut shown = config.clone();
    shown.auth.secret = "<hidden>".into();
    match toml::to_string(&shown) {
        Ok(t) => print!("{t}"),
        Err(e) => {
            eprintln!("dualstream-gateway: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// `token`: a token signed with the configured secret.
fn print_token(config: &GatewayConfig, claims: TokenArgs) -> ExitCode {
    let TokenArgs { read, publish, ttl, sub, admin } = claims;
    let auth = match Auth::new(&config.auth) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dualstream-gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    let claims = dualstream_gateway::Claims { admin, ..auth.claims(sub, read, publish, ttl) };
    match auth.mint(&claims) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dualstream-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `serve`: until SIGINT or SIGTERM.
async fn serve(config: GatewayConfig, meter: Meter) -> ExitCode {
    let handle = install_recorder(&meter);
    let gateway = match Gateway::with_metrics(config, handle).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("dualstream-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    // The metrics read from the components' counters, set before each OTLP export (a scrape of
    // /metrics sets them itself).
    #[cfg(feature = "otlp")]
    if let Some((_, interval)) = meter {
        let g = gateway.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval / 2);
            loop {
                every.tick().await;
                g.export_metrics().await;
            }
        });
    }
    let listen = gateway.config().listen;
    let listener = match dualstream_gateway::listen(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("dualstream-gateway: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(%listen, "dualstream-gateway listening");
    match gateway.serve(listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dualstream-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
