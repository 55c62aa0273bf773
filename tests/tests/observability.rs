//! The gateway's `/metrics` and the Grafana dashboard in
//! docs/grafana/dualstream.json: every metric the dashboard queries is one a
//! running gateway exports, and the gateway's own counters count what a
//! client received (docs/observability.md).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dualstream_gateway::{metric_names, telemetry};
use dualstream_tests::collector::FakeCollector;
use dualstream_tests::gateway::{user_event, Sse, TestGateway};
use dualstream_tests::init_tracing;
use serde_json::Value;

/// The metric names in one PromQL expression: identifiers that start with
/// `dualstream_`, or with `messaging_client_` (OpenTelemetry's names).
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = ["dualstream_", "messaging_client_"].iter().filter_map(|p| rest.find(p)).min() {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every target expression of every panel of the dashboard.
fn dashboard_exprs() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/grafana/dualstream.json");
    let text = std::fs::read_to_string(path).expect("the dashboard");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("a target has an expr").to_owned());
        }
    }
    exprs
}

/// The value of the series `name{labels}` in a Prometheus text scrape, with
/// its labels in any order.
fn value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        (n == name && labels.iter().all(|(k, val)| rest.contains(&format!("{k}=\"{val}\"")))).then(|| v.parse().ok())?
    })
}

/// Every data point the collector received: the metric's name, the
/// point's attributes and its value (a histogram's count).
fn otlp_points(collector: &FakeCollector) -> Vec<(String, BTreeMap<String, String>, f64)> {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
    use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point::Value as N, NumberDataPoint};
    use prost::Message;
    let attrs = |kv: &[KeyValue]| -> BTreeMap<String, String> {
        let text = |v: &Option<any_value::Value>| match v {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            other => format!("{other:?}"),
        };
        kv.iter().map(|kv| (kv.key.clone(), text(&kv.value.as_ref().and_then(|v| v.value.clone())))).collect()
    };
    let number = |p: &NumberDataPoint| match p.value {
        Some(N::AsDouble(d)) => d,
        Some(N::AsInt(i)) => i as f64,
        None => f64::NAN,
    };
    let mut points = Vec::new();
    for (path, body) in collector.received(Duration::from_secs(2)) {
        assert_eq!(path, "/v1/metrics");
        let request = ExportMetricsServiceRequest::decode(body.as_slice()).expect("an OTLP metrics request");
        for m in request.resource_metrics.iter().flat_map(|r| &r.scope_metrics).flat_map(|s| &s.metrics) {
            let name = || m.name.clone();
            match &m.data {
                Some(Data::Sum(s)) => {
                    points.extend(s.data_points.iter().map(|p| (name(), attrs(&p.attributes), number(p))))
                }
                Some(Data::Gauge(g)) => {
                    points.extend(g.data_points.iter().map(|p| (name(), attrs(&p.attributes), number(p))))
                }
                Some(Data::Histogram(h)) => {
                    points.extend(h.data_points.iter().map(|p| (name(), attrs(&p.attributes), p.count as f64)))
                }
                _ => {}
            }
        }
    }
    points
}

#[test]
fn the_dashboard_queries_its_expressions_names() {
    assert_eq!(
        metric_names_in("sum by (mode) (rate(dualstream_a_total[1m])) / dualstream_b + messaging_client_c{x=\"1\"}"),
        ["dualstream_a_total", "dualstream_b", "messaging_client_c"]
    );
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 20, "{} expressions", exprs.len());
    let queried: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names_in(e)).collect();
    for name in metric_names::ALL {
        assert!(queried.contains(name), "the dashboard has no panel for {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported_by_a_running_gateway() {
    init_tracing();
    // Prometheus and, beside it, OTLP to a fake collector: what the gateway binary installs with the
    // `otlp` feature and OTEL_EXPORTER_OTLP_ENDPOINT set (an export an hour: the test flushes).
    let collector = FakeCollector::start();
    let meter = telemetry::otlp_meter(&collector.endpoint, "metrics-test", Duration::from_secs(3600)).expect("meter");
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = prometheus.handle();
    metrics::set_global_recorder(telemetry::with_otlp(prometheus, &meter)).expect("the only recorder of this binary");
    let gw = TestGateway::start_with_metrics(handle, |_| {}).await;
    let a = gw.channel("observed");
    let reader = format!("Bearer {}", gw.token(&[&a], &[]));
    let url = |mode: &str| format!("{}/v1/stream?channel={}&mode={mode}", gw.base, a.replace(':', "%3A"));
    let mut notify = Sse::open(&gw.http, &url("notify"), &[("authorization", &reader)]).await;
    let mut full = Sse::open(&gw.http, &url("full"), &[("authorization", &reader)]).await;
    assert_eq!((notify.status, full.status), (200, 200), "{} {}", notify.error, full.error);
    for sse in [&mut notify, &mut full] {
        assert_eq!(sse.next(Duration::from_secs(10)).await.map(|f| f.event), Some("subscribed".into()));
    }
    let events: Vec<Value> = (0..5).map(|i| user_event("observed", i)).collect();
    let (status, reply) = gw.ingest(&gw.token(&[], &["user"]), &Value::Array(events)).await;
    assert_eq!((status, reply["stored"].as_u64()), (200, Some(5)), "{reply}");
    for sse in [&mut notify, &mut full] {
        let mut got = 0;
        while got < 5 {
            let f = sse.next(Duration::from_secs(20)).await.expect("the five events");
            got += usize::from(f.event == "event");
        }
    }

    let r = gw.http.get(format!("{}/metrics", gw.base)).bearer_auth(gw.admin_token()).send().await.expect("scrape");
    assert_eq!(r.status().as_u16(), 200);
    let scrape = r.text().await.expect("text");
    let exported: BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or(""))
        .collect();
    let exprs = dashboard_exprs();
    let missing: BTreeSet<String> =
        exprs.iter().flat_map(|e| metric_names_in(e)).filter(|n| !exported.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "queried by the dashboard, not exported: {missing:?}\n{scrape}");

    // The gateway's own counters count what the clients received.
    let delivered = |mode| value(&scrape, metric_names::DELIVERIES, &[("transport", "sse"), ("mode", mode)]);
    assert_eq!((delivered("notify"), delivered("full")), (Some(5.0), Some(5.0)), "{scrape}");
    assert_eq!(value(&scrape, metric_names::CLIENTS, &[("transport", "sse")]), Some(2.0));
    assert_eq!(value(&scrape, metric_names::INGESTED, &[]), Some(5.0));
    let stored = [("messaging_system", "kafka"), ("messaging_destination_name", gw.topic.as_str())];
    assert_eq!(value(&scrape, "messaging_client_sent_messages_total", &stored), Some(5.0), "{scrape}");
    let published = [("messaging_system", "redis"), ("messaging_operation_name", "publish")];
    assert!(value(&scrape, "messaging_client_sent_messages_total", &published).is_some_and(|n| n >= 1.0));
    assert_eq!(value(&scrape, metric_names::BREAKER, &[]), Some(0.0), "Redis is up: the breaker is closed");
    assert_eq!(value(&scrape, metric_names::HUB_SUBSCRIBERS, &[]), Some(2.0));
    assert_eq!(value(&scrape, metric_names::CLOSED, &[("transport", "sse"), ("reason", "slow_client")]), Some(0.0));
    let subscriptions =
        |scrape: &str, mode| value(scrape, metric_names::SUBSCRIPTIONS, &[("transport", "sse"), ("mode", mode)]);
    assert_eq!((subscriptions(&scrape, "notify"), subscriptions(&scrape, "full")), (Some(1.0), Some(1.0)), "{scrape}");
    // One catch-up join for each client, each one current (the lag's own test is the consumer crate's).
    assert_eq!(value(&scrape, metric_names::JOINS, &[]), Some(2.0), "{scrape}");
    assert!(value(&scrape, metric_names::JOIN_LAG_MAX, &[]).is_some_and(|lag| (0.0..=5.0).contains(&lag)), "{scrape}");

    // The same counts over OTLP, under OpenTelemetry's names where its conventions have one.
    gw.gateway.export_metrics().await;
    let flushed = tokio::task::spawn_blocking(move || meter.force_flush()).await.expect("join");
    assert!(flushed.is_ok(), "the OTLP export: {flushed:?}");
    let points = otlp_points(&collector);
    let point = |name: &str, attrs: &[(&str, &str)]| {
        points.iter().find(|(n, a, _)| n == name && attrs.iter().all(|(k, v)| a.get(*k).map(String::as_str) == Some(v)))
    };
    let stored = [("messaging.system", "kafka"), ("messaging.destination.name", gw.topic.as_str())];
    let sent = point("messaging.client.sent.messages", &stored).map(|p| p.2);
    assert_eq!(sent, Some(5.0), "{points:?}");
    let by_mode = |mode| point("dualstream_gateway_deliveries", &[("transport", "sse"), ("mode", mode)]).map(|p| p.2);
    assert_eq!((by_mode("notify"), by_mode("full")), (Some(5.0), Some(5.0)), "{points:?}");
    assert_eq!(point(metric_names::JOINS, &[]).map(|p| p.2), Some(2.0), "{points:?}");
    assert_eq!(point(metric_names::CLIENTS, &[("transport", "sse")]).map(|p| p.2), Some(2.0), "{points:?}");
    assert!(point("messaging.client.operation.duration", &[("messaging.system", "kafka")]).is_some(), "{points:?}");
    assert!(point("messaging_client_sent_messages_total", &[]).is_none(), "a Prometheus name over OTLP");

    // Closed streams leave no subscription counted.
    drop((notify, full));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw.http.get(format!("{}/metrics", gw.base)).bearer_auth(gw.admin_token()).send().await.expect("scrape");
        let scrape = r.text().await.expect("text");
        let left = (subscriptions(&scrape, "notify"), subscriptions(&scrape, "full"));
        let joins = value(&scrape, metric_names::JOINS, &[]);
        if left == (Some(0.0), Some(0.0)) && joins == Some(0.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "subscriptions or joins still counted 10 s after the streams closed: {left:?} {joins:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
