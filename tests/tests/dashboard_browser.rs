//! The gateway in a real browser: a headless Chromium (through chromedriver and fantoccini) opens the
//! dashboard at `/`, events are published over HTTP, and the page must show their ids in `#latest`, their
//! source types with exact totals in `#rates`, and Kafka "up"; and a page's `EventSource` opened with a
//! ticket (docs/getting-started.md's snippet) receives the events published after it.
//!
//! Needs the stack (`cargo xtask test`) and `chromium` + `chromedriver` on PATH: without them the test
//! fails and says how to install them. With `DASHBOARD_SCREENSHOT=<path>` set, the page as last checked
//! is saved there as PNG (how docs/gateway-dashboard.png was made).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dualstream_tests::browser::Chromedriver;
use dualstream_tests::gateway::TestGateway;
use serde_json::{json, Value};

/// What the page shows, read in one script so that rows replaced by the next update cannot go stale
/// between reads.
const SNAPSHOT: &str = r##"
const text = (id) => document.getElementById(id).textContent;
return {
  status: text("status"),
  kafka: text("kafka"),
  kafka_class: document.getElementById("kafka").className,
  redis: text("redis"),
  latest: [...document.querySelectorAll("#latest tr")].map((r) => [r.dataset.id, r.cells[0].textContent]),
  rates: [...document.querySelectorAll("#rates tr")].map((r) => [r.dataset.sourceType, r.cells[2].textContent]),
};
"##;

/// A chromedriver, a gateway of this test's own, and a headless browser showing its dashboard.
async fn open_dashboard() -> (Chromedriver, TestGateway, fantoccini::Client) {
    let driver = Chromedriver::start();
    let gw = TestGateway::start(|_| {}).await;
    let client = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(driver.headless(1280, 860))
        .connect(&driver.url())
        .await
        .expect("a WebDriver session on chromedriver");
    // The feed needs an admin token: in the fragment, as `cargo xtask gateway` prints it.
    client.goto(&format!("{}/#token={}", gw.base, gw.admin_token())).await.expect("open the dashboard");
    (driver, gw, client)
}

/// Publish one event per `(source type, source id)` in one request; the ids the gateway gave them.
async fn publish(gw: &TestGateway, token: &str, sources: &[(&str, &str)]) -> Vec<String> {
    let batch: Vec<Value> = sources
        .iter()
        .enumerate()
        .map(|(n, (ty, id))| json!({"type": "dashboard.test", "source_type": ty, "source_id": id, "payload": {"n": n}}))
        .collect();
    let (status, reply) = gw.ingest(token, &Value::Array(batch)).await;
    assert_eq!(status, 200, "ingest: {reply}");
    let ids: Vec<String> = reply["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["id"].as_str().expect("an id per event").to_owned())
        .collect();
    assert_eq!(ids.len(), sources.len(), "{reply}");
    ids
}

/// Read the page until it shows every id in `#latest` (as the row's `data-id` and its text), exactly
/// `totals` in `#rates`, Kafka up and the feed live; panics with what it last showed after 30 s (the feed
/// sends its state once a second: a few updates at most, even on a loaded machine).
async fn wait_shown(client: &fantoccini::Client, ids: &[String], totals: &[(&str, u64)]) -> Value {
    let want: BTreeMap<String, String> = totals.iter().map(|(t, n)| (t.to_string(), n.to_string())).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = client.execute(SNAPSHOT, vec![]).await.expect("read the page");
        // [data attribute, visible text] per row.
        let rows = |key: &str| -> BTreeMap<String, String> {
            serde_json::from_value::<Vec<(String, String)>>(last[key].clone()).unwrap_or_default().into_iter().collect()
        };
        let (latest, rates) = (rows("latest"), rows("rates"));
        let all_ids = ids.iter().all(|id| latest.get(id) == Some(id));
        if all_ids && rates == want && last["kafka"] == "up" && last["kafka_class"] == "ok" && last["status"] == "live"
        {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "within 30 s the dashboard did not show ids {ids:?} in #latest, totals {want:?} in #rates, Kafka up \
             and the feed live; the page last showed {last:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_published_events_in_a_headless_browser() {
    let (_driver, gw, client) = open_dashboard().await;
    let token = gw.token(&[], &["*"]);

    // The gateway is this test's own, so its totals are exactly what the test published.
    let first = [("user", "alice"), ("user", "bob"), ("order", "o-1001"), ("user", "alice")];
    let mut ids = publish(&gw, &token, &first).await;
    wait_shown(&client, &ids, &[("order", 1), ("user", 3)]).await;
    // Later updates too: new rows on top of the old ones, totals moved on.
    ids.extend(publish(&gw, &token, &[("order", "o-1002"), ("user", "carol"), ("order", "o-1003")]).await);
    wait_shown(&client, &ids, &[("order", 3), ("user", 4)]).await;

    let png = client.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG ({} bytes)", png.len());
    if let Some(path) = std::env::var_os("DASHBOARD_SCREENSHOT") {
        std::fs::write(&path, &png).unwrap_or_else(|e| panic!("{}: {e}", path.to_string_lossy()));
    }
    client.close().await.expect("close the browser session");
}

/// docs/getting-started.md's `EventSource` snippet, run in the dashboard's page (same origin): a token
/// traded for a ticket, the ticket in the stream's URL; the page then receives what is published.
const EVENT_SOURCE: &str = r##"
const [token, pattern, done] = arguments;
window.received = [];
fetch("/v1/tickets", { method: "POST", headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
  body: JSON.stringify({ patterns: [pattern] }) })
  .then((r) => r.json())
  .then(({ ticket }) => {
    const es = new EventSource(`/v1/stream?pattern=${encodeURIComponent(pattern)}&ticket=${ticket}`);
    es.addEventListener("subscribed", () => done("subscribed"));
    es.addEventListener("event", (m) => window.received.push(JSON.parse(m.data)));
    es.onerror = () => done("error");
  })
  .catch((e) => done(`fetch failed: ${e}`));
"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_receives_published_events_over_event_source_with_a_ticket() {
    let (_driver, gw, client) = open_dashboard().await;
    let pattern = format!("{}:*", gw.prefix);
    let token = gw.token(&[&pattern], &["*"]);
    let opened =
        client.execute_async(EVENT_SOURCE, vec![json!(token), json!(pattern)]).await.expect("run the snippet");
    assert_eq!(opened, "subscribed", "the page's EventSource did not open its stream");

    let mut ids = publish(&gw, &token, &[("user", "alice"), ("order", "o-1001")]).await;
    ids.sort();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = client.execute("return window.received.map((e) => e.id);", vec![]).await.expect("read the page");
        let mut got: Vec<String> = serde_json::from_value(got).unwrap_or_default();
        // Two channels: Redis keeps each one's order, not the order between them.
        got.sort();
        if got == ids {
            break;
        }
        assert!(Instant::now() < deadline, "within 30 s the page received {got:?}, not {ids:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.close().await.expect("close the browser session");
}
