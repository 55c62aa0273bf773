//! The gateway's `/metrics` and the Grafana dashboard in
//! docs/grafana/dualstream.json: every metric the dashboard queries is one a
//! running gateway exports, and the gateway's own counters count what a
//! client received (docs/observability.md).

use std::collections::BTreeSet;
use std::time::Duration;

use dualstream_gateway::metric_names;
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
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().expect("the recorder");
    let gw = TestGateway::start_with_metrics(recorder, |_| {}).await;
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
    let subscriptions = |scrape: &str, mode| value(scrape, metric_names::SUBSCRIPTIONS, &[("transport", "sse"), ("mode", mode)]);
    assert_eq!((subscriptions(&scrape, "notify"), subscriptions(&scrape, "full")), (Some(1.0), Some(1.0)), "{scrape}");

    // Closed streams leave no subscription counted.
    drop((notify, full));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = gw.http.get(format!("{}/metrics", gw.base)).bearer_auth(gw.admin_token()).send().await.expect("scrape");
        let scrape = r.text().await.expect("text");
        let left = (subscriptions(&scrape, "notify"), subscriptions(&scrape, "full"));
        if left == (Some(0.0), Some(0.0)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "subscriptions still counted 10 s after the streams closed: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
