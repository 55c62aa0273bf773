//! The PostgreSQL sinks against a real server: `DATABASE_URL`, by default the
//! local one (`postgres://postgres@127.0.0.1:5432/postgres`). Each test works
//! in a schema and on channels of its own, and drops its schema at the end.
//! Notifications are received by a plain tokio-postgres `LISTEN` session,
//! independent of the notifier's code.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualstream_batch::{BatchConfig, BatchEngine, BatchError};
use dualstream_core::{
    DurableSink, Event, EventId, Limits, Notification, NotifyError, Position, RealtimeNotifier, SinkError,
};
use dualstream_example_postgres::{
    ChannelScope, ConnectionConfig, OutboxConfig, OutboxSink, PgError, PgNotifier, PgNotifierConfig, PgNotifyError,
    SetupError, DEFAULT_URL, MAX_PAYLOAD_BYTES,
};
use dualstream_publisher::{DualPublisher, NotificationOutcome, PublishError, PublisherConfig};
use futures::StreamExt;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls, Socket};

/// Every wait on the server is bounded by this.
const WAIT: Duration = Duration::from_secs(20);

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A plain connection, or a failure that says how to point the tests at a
/// server.
async fn plain_client() -> (Client, Connection<Socket, NoTlsStream>) {
    let url = database_url();
    match tokio::time::timeout(WAIT, tokio_postgres::connect(&url, NoTls)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => panic!(
            "PostgreSQL is not reachable at {url:?}: {e}. These tests need a server: start one, or set DATABASE_URL \
             (default {DEFAULT_URL})"
        ),
        Err(_) => panic!(
            "PostgreSQL at {url:?} did not answer within {WAIT:?}. These tests need a server: start one, or set \
             DATABASE_URL (default {DEFAULT_URL})"
        ),
    }
}

async fn admin() -> Client {
    let (client, connection) = plain_client().await;
    tokio::spawn(connection);
    client
}

/// `f` on the server, bounded.
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: {e:?}"),
        Err(_) => panic!("{what}: no answer within {WAIT:?}"),
    }
}

/// A test's schema, channel prefix and application name.
struct Fixture {
    schema: String,
    prefix: String,
    admin: Client,
}

impl Fixture {
    async fn new(test: &str) -> Self {
        let schema = format!("dsx_{test}_{}", std::process::id());
        let admin = admin().await;
        bounded("drop an old schema", admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))).await;
        Self { prefix: schema.replace('_', "-"), schema, admin }
    }

    fn connection(&self) -> ConnectionConfig {
        let url = database_url();
        let sep = if !url.contains("://") {
            " "
        } else if url.contains('?') {
            "&"
        } else {
            "?"
        };
        ConnectionConfig { url: format!("{url}{sep}application_name={}", self.schema), ..Default::default() }
    }

    fn outbox(&self) -> OutboxConfig {
        OutboxConfig {
            connection: self.connection(),
            schema: self.schema.clone(),
            table: "outbox".into(),
            ..Default::default()
        }
    }

    async fn sink(&self) -> OutboxSink {
        OutboxSink::connect(self.outbox()).await.expect("outbox sink")
    }

    fn notifier(&self, channels: ChannelScope) -> PgNotifier {
        let config = PgNotifierConfig {
            connection: self.connection(),
            channel_prefix: self.prefix.clone(),
            channels,
            timeout_ms: WAIT.as_millis() as u64,
        };
        PgNotifier::new(config).expect("notifier")
    }

    /// The channel of a source, written out here rather than asked of the
    /// notifier (ids in these tests need no escaping).
    fn channel(&self, source_type: &str, source_id: Option<&str>) -> String {
        match source_id {
            Some(id) => format!("{}:{source_type}:{id}", self.prefix),
            None => format!("{}:{source_type}", self.prefix),
        }
    }

    fn log(&self) -> Arc<str> {
        format!("{}.outbox", self.schema).into()
    }

    /// The outbox, ordered by source and sequence: (source id, seq, event id).
    async fn rows(&self) -> Vec<(String, i64, String)> {
        let sql =
            format!("SELECT source_id, seq, id::text FROM {}.outbox ORDER BY source_type, source_id, seq", self.schema);
        let rows = bounded("read the outbox", self.admin.query(&sql, &[])).await;
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
    }

    async fn cleanup(self) {
        bounded("drop the schema", self.admin.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))).await;
    }
}

/// A publisher whose notification bounds are far above what any call takes
/// here, even on a loaded machine: the tests check what arrives, not how fast.
fn publisher(sink: OutboxSink, notifier: PgNotifier) -> DualPublisher {
    let config = PublisherConfig {
        notify_timeout_ms: WAIT.as_millis() as u64,
        pipeline_timeout_ms: WAIT.as_millis() as u64,
        ..Default::default()
    };
    let builder = DualPublisher::builder().durable(Arc::new(sink)).notifier(Arc::new(notifier));
    builder.config(config).build().expect("publisher")
}

fn event(source_type: &str, source_id: &str, i: usize) -> Event {
    Event::builder(format!("{source_type}.changed"), source_type, source_id)
        .payload(format!(r#"{{"i":{i}}}"#))
        .header("trace", format!("t{i}"))
        .build()
        .expect("valid event")
}

/// What the outbox must hold for `events` (all stored, in input order per
/// source): sorted like [`Fixture::rows`], sequences from 1 per source.
fn expected_rows(events: &[Event]) -> Vec<(String, i64, String)> {
    let mut rows: Vec<(String, i64, String)> = Vec::new();
    let mut next: BTreeMap<&str, i64> = BTreeMap::new();
    for e in events {
        let seq = next.entry(e.source().source_id()).or_insert(0);
        *seq += 1;
        rows.push((e.source().source_id().to_owned(), *seq, e.id().to_string()));
    }
    rows.sort();
    rows
}

/// The position each event must get: its rank in its source, from 1.
fn expected_positions(events: &[Event], log: &Arc<str>) -> Vec<Position> {
    let mut next: BTreeMap<&str, i64> = BTreeMap::new();
    events
        .iter()
        .map(|e| {
            let seq = next.entry(e.source().source_id()).or_insert(0);
            *seq += 1;
            Position::new(log.clone(), 0, *seq)
        })
        .collect()
}

/// A plain `LISTEN` session: notifications arrive on a channel as
/// (channel, payload).
struct Listener {
    client: Client,
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
}

impl Listener {
    async fn connect() -> Self {
        let (client, mut connection) = plain_client().await;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
                }
            }
        });
        Self { client, rx }
    }

    async fn listen(&self, channel: &str) {
        let sql = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
        bounded("LISTEN", self.client.batch_execute(&sql)).await;
    }

    /// Exactly `n` notifications, within [`WAIT`].
    async fn take(&mut self, n: usize) -> Vec<(String, Notification)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((channel, payload))) => {
                    let decoded = Notification::from_json_with_limits(payload.as_bytes(), &Limits::lenient());
                    got.push((channel, decoded.expect("a notification's JSON")));
                }
                Ok(None) => panic!("the LISTEN connection ended after {} of {n} notifications", got.len()),
                Err(_) => panic!("{} of {n} notifications within {WAIT:?}", got.len()),
            }
        }
        got
    }

    /// Nothing more arrives: a marker sent now is the next notification.
    async fn nothing_before(&mut self, marker: &str) {
        let sql = format!("NOTIFY \"{}\", 'marker'", marker.replace('"', "\"\""));
        bounded("NOTIFY marker", self.client.batch_execute(&sql)).await;
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some((channel, payload))) => assert_eq!((channel.as_str(), payload.as_str()), (marker, "marker")),
            other => panic!("expected the marker, got {other:?}"),
        }
    }
}

/// Per channel, the notifications must be those of `events` that go there,
/// in order, each with its event's position.
fn assert_notified(got: &[(String, Notification)], channel: &str, events: &[&Event], positions: &[&Position]) {
    let on: Vec<&Notification> = got.iter().filter(|(c, _)| c == channel).map(|(_, n)| n).collect();
    let ids: Vec<EventId> = on.iter().map(|n| n.id).collect();
    assert_eq!(ids, events.iter().map(|e| e.id()).collect::<Vec<_>>(), "notifications on {channel}, in order");
    for ((n, e), p) in on.iter().zip(events).zip(positions) {
        assert_eq!(n, &&Notification::for_event(e, Some((*p).clone())), "notification of {}", e.id());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_stores_each_source_in_order_and_a_listener_gets_every_notification() {
    let fx = Fixture::new("publisher").await;
    let sink = fx.sink().await;
    let notifier = fx.notifier(ChannelScope::PerSource);
    sink.health_check().await.expect("outbox healthy");
    notifier.health_check().await.expect("notifier healthy");
    let mut listener = Listener::connect().await;
    let sources = ["a", "b", "c"];
    for s in sources {
        listener.listen(&fx.channel("user", Some(s))).await;
    }
    let publisher = publisher(sink, notifier);

    let events: Vec<Event> = (0..30).map(|i| event("user", sources[i % 3], i)).collect();
    let mut receipts = Vec::new();
    for e in &events[..15] {
        receipts.push(publisher.publish(e.clone()).await.expect("stored"));
    }
    for r in publisher.publish_batch(events[15..].to_vec()).await {
        receipts.push(r.expect("stored"));
    }
    let positions = expected_positions(&events, &fx.log());
    for ((receipt, e), p) in receipts.iter().zip(&events).zip(&positions) {
        assert_eq!((receipt.event_id, receipt.position.as_ref()), (e.id(), Some(p)));
        assert_eq!(receipt.notification, NotificationOutcome::Sent);
    }
    assert_eq!(fx.rows().await, expected_rows(&events));

    // A stored row is the event: payload, headers, type, time.
    let sql = format!(
        "SELECT event_type, occurred_at, payload, headers::text FROM {}.outbox WHERE id = $1::text::uuid",
        fx.schema
    );
    let row = bounded("read one row", fx.admin.query_one(&sql, &[&events[4].id().to_string()])).await;
    let headers: BTreeMap<String, String> = serde_json::from_str(row.get(3)).expect("headers as JSON");
    let stored = Event::builder(row.get::<_, String>(0), "user", "b")
        .id(events[4].id())
        .occurred_at(row.get(1))
        .payload(row.get::<_, Vec<u8>>(2))
        .header("trace", headers.get("trace").cloned().unwrap_or_default())
        .build()
        .expect("valid");
    assert_eq!(stored, events[4]);

    let got = listener.take(events.len()).await;
    for s in sources {
        let (of_source, at): (Vec<&Event>, Vec<&Position>) =
            events.iter().zip(&positions).filter(|(e, _)| e.source().source_id() == s).unzip();
        assert_notified(&got, &fx.channel("user", Some(s)), &of_source, &at);
    }
    publisher.shutdown(WAIT).await.expect("flushed");
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_engine_stores_each_source_in_order_and_a_listener_gets_every_notification() {
    let fx = Fixture::new("engine").await;
    let mut listener = Listener::connect().await;
    listener.listen(&fx.channel("order", None)).await;
    listener.listen(&fx.channel("order", Some("o3"))).await;
    let publisher = publisher(fx.sink().await, fx.notifier(ChannelScope::Both));
    let config = BatchConfig { lanes: 4, notify_pipelines: 2, max_in_flight_batches: 4, ..Default::default() };
    let engine = BatchEngine::new(publisher, config).expect("engine");

    let events: Vec<Event> = (0..1_000).map(|i| event("order", &format!("o{}", i % 20), i)).collect();
    let mut results = engine.submit_many(events[..600].to_vec()).await;
    results.extend(futures::future::join_all(events[600..].iter().cloned().map(|e| engine.submit(e))).await);
    engine.shutdown().await;
    let positions = expected_positions(&events, &fx.log());
    for ((r, e), p) in results.into_iter().zip(&events).zip(&positions) {
        let receipt = r.expect("stored");
        assert_eq!((receipt.event_id, receipt.position.as_ref()), (e.id(), Some(p)));
    }
    assert_eq!(fx.rows().await, expected_rows(&events));

    let got = listener.take(events.len() + 50).await;
    // The aggregate channel carries every source, each in its order (the
    // engine's pipelines may interleave sources).
    for s in 0..20 {
        let source = format!("o{s}");
        let of_source: Vec<(String, Notification)> =
            got.iter().filter(|(_, n)| *n.source_id == *source).cloned().collect();
        let (expected, at): (Vec<&Event>, Vec<&Position>) =
            events.iter().zip(&positions).filter(|(e, _)| e.source().source_id() == source).unzip();
        assert_notified(&of_source, &fx.channel("order", None), &expected, &at);
        if s == 3 {
            assert_notified(&of_source, &fx.channel("order", Some("o3")), &expected, &at);
        }
    }
    listener.nothing_before(&fx.channel("order", None)).await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constraint_violation_fails_that_event_and_the_later_events_of_its_source() {
    let fx = Fixture::new("constraint").await;
    let sink = fx.sink().await;
    let sql = format!("ALTER TABLE {}.outbox ADD CONSTRAINT no_poison CHECK (event_type <> 'poison')", fx.schema);
    bounded("add a constraint", fx.admin.batch_execute(&sql)).await;
    let poison = |id: &str| Event::builder("poison", "user", id).build().expect("valid");

    // The sink's own batch call.
    let batch =
        vec![event("user", "a", 1), poison("a"), event("user", "a", 3), event("user", "b", 1), event("user", "b", 2)];
    let results = sink.publish_batch(batch.clone()).await;
    let log = fx.log();
    assert_eq!(results[0].as_ref().expect("a1 stored"), &Position::new(log.clone(), 0, 1));
    match &results[1] {
        Err(d) => {
            let why = |r: &str| r.contains("no_poison") && r.contains("23514");
            assert!(matches!(&d.error, SinkError::Rejected { reason } if why(reason)), "{d}");
            assert!(!d.is_retriable());
            assert_eq!(*d.event, batch[1], "the event is handed back");
        }
        Ok(p) => panic!("a poison event was stored at {p}"),
    }
    match &results[2] {
        Err(d) => assert!(
            matches!(&d.error, SinkError::EarlierFailed { earlier, retriable: false } if earlier.contains("no_poison")),
            "{d}"
        ),
        Ok(p) => panic!("a later event of the failed source was stored at {p}"),
    }
    assert_eq!(results[3].as_ref().expect("b1 stored"), &Position::new(log.clone(), 0, 1));
    assert_eq!(results[4].as_ref().expect("b2 stored"), &Position::new(log.clone(), 0, 2));
    let stored = |events: &[&Event]| expected_rows(&events.iter().map(|e| (*e).clone()).collect::<Vec<_>>());
    assert_eq!(fx.rows().await, stored(&[&batch[0], &batch[3], &batch[4]]));

    // Through the batch engine and the publisher: the same, and only stored
    // events are notified. The failed event took no sequence number.
    let mut listener = Listener::connect().await;
    listener.listen(&fx.channel("user", Some("a"))).await;
    let publisher = publisher(sink, fx.notifier(ChannelScope::PerSource));
    let engine = BatchEngine::new(publisher, BatchConfig::default()).expect("engine");
    let more = vec![event("user", "a", 4), poison("a"), event("user", "a", 6), event("user", "c", 1)];
    let results = engine.submit_many(more.clone()).await;
    engine.shutdown().await;
    assert_eq!(results[0].as_ref().expect("a4 stored").position, Some(Position::new(log.clone(), 0, 2)));
    let durable = |r: &Result<_, BatchError>| match r {
        Err(BatchError::Publish(PublishError::Durable(d))) => d.error.to_string(),
        other => panic!("expected a durable failure, got {other:?}"),
    };
    assert!(durable(&results[1]).contains("no_poison"), "{}", durable(&results[1]));
    assert!(durable(&results[2]).starts_with("not sent: an earlier event"), "{}", durable(&results[2]));
    assert_eq!(results[3].as_ref().expect("c1 stored").position, Some(Position::new(log.clone(), 0, 1)));
    assert_eq!(fx.rows().await, stored(&[&batch[0], &more[0], &batch[3], &batch[4], &more[3]]));
    let got = listener.take(1).await;
    assert_notified(&got, &fx.channel("user", Some("a")), &[&more[0]], &[&Position::new(log, 0, 2)]);
    listener.nothing_before(&fx.channel("user", Some("a"))).await;
    fx.cleanup().await;
}

/// Waits until `predicate` holds on the server, within [`WAIT`].
async fn wait_for(admin: &Client, what: &str, sql: &str, param: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let row = bounded(what, admin.query_one(sql, &[&param])).await;
        if row.get::<_, bool>(0) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_mid_batch_fails_the_batch_and_the_sink_reconnects_for_the_retry() {
    let fx = Fixture::new("closed").await;
    let sink = fx.sink().await;
    let log = fx.log();
    let a1 = event("user", "a", 1);
    assert_eq!(sink.publish(a1.clone()).await.expect("a1"), Position::new(log.clone(), 0, 1));

    // Hold source a's counter row, so that the next batch waits in the
    // server; then end the sink's session under it.
    let mut holder = admin().await;
    let tx = bounded("begin", holder.transaction()).await;
    let lock = format!("SELECT last_seq FROM {}.outbox_sources WHERE source_id = 'a' FOR UPDATE", fx.schema);
    bounded("lock source a", tx.query_one(&lock, &[])).await;
    let batch = vec![event("user", "a", 2), event("user", "b", 1), event("user", "a", 3)];
    let pending = sink.enqueue_batch(batch.clone()).await;
    let waiting =
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock')";
    wait_for(&fx.admin, "the batch waits for the lock", waiting, &fx.schema).await;
    let kill = "SELECT count(pg_terminate_backend(pid)) > 0 FROM pg_stat_activity WHERE application_name = $1";
    wait_for(&fx.admin, "terminate the sink's session", kill, &fx.schema).await;
    let results = tokio::time::timeout(WAIT, pending).await.expect("the batch fails within the bound");
    bounded("release the lock", tx.rollback()).await;

    let errors: Vec<SinkError> = results.into_iter().map(|r| r.expect_err("not stored").error).collect();
    assert!(matches!(&errors[0], SinkError::Broker { retriable: true, .. }), "a2: {}", errors[0]);
    assert!(matches!(&errors[1], SinkError::Broker { retriable: true, .. }), "b1: {}", errors[1]);
    assert!(matches!(&errors[2], SinkError::EarlierFailed { retriable: true, .. }), "a3: {}", errors[2]);
    assert_eq!(fx.rows().await, expected_rows(std::slice::from_ref(&a1)), "the batch was rolled back");

    // The retry reconnects; a retry of stored events stores nothing twice.
    let results = sink.publish_batch(batch.clone()).await;
    let positions: Vec<Position> = results.into_iter().map(|r| r.expect("stored on retry")).collect();
    let expected = [2, 1, 3].map(|seq| Position::new(log.clone(), 0, seq));
    assert_eq!(positions, expected);
    assert_eq!(sink.publish(batch[0].clone()).await.expect("idempotent"), expected[0]);
    let all = [a1, batch[0].clone(), batch[1].clone(), batch[2].clone()];
    assert_eq!(fx.rows().await, expected_rows(&all));
    sink.health_check().await.expect("healthy again");
    sink.flush(WAIT).await.expect("flushed");
    fx.cleanup().await;
}

/// A notification whose JSON is exactly `bytes` long (a long source id).
fn notification_of(bytes: usize) -> Notification {
    let e = Event::builder("user.created", "user", "x").build().expect("valid");
    let mut n = Notification::for_event(&e, Some(Position::new("log", 0, 1)));
    let base = n.to_json().len() - 1;
    n.source_id = "x".repeat(bytes - base).into();
    assert_eq!(n.to_json().len(), bytes);
    n
}

fn refusal(e: NotifyError) -> PgNotifyError {
    match e {
        NotifyError::Other(inner) => match inner.downcast::<PgNotifyError>() {
            Ok(typed) => *typed,
            Err(other) => panic!("expected a PgNotifyError, got {other}"),
        },
        other => panic!("expected NotifyError::Other, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_notification_is_a_typed_error_and_the_rest_of_the_batch_is_sent() {
    let fx = Fixture::new("oversized").await;
    let mut listener = Listener::connect().await;
    let channel = fx.channel("user", None);
    listener.listen(&channel).await;
    let notifier = fx.notifier(ChannelScope::PerSourceType);

    // PostgreSQL's own limit is where the notifier puts it.
    let fits =
        bounded("NOTIFY 7999 bytes", fx.admin.query("SELECT pg_notify('dsx-limit', repeat('x', 7999))", &[])).await;
    assert_eq!(fits.len(), 1);
    let over =
        tokio::time::timeout(WAIT, fx.admin.query("SELECT pg_notify('dsx-limit', repeat('x', 8000))", &[])).await;
    let over = over.expect("answer").expect_err("8000 bytes refused");
    assert_eq!(over.code().map(|c| c.code()), Some("22023"), "{over:?}");

    let largest = notification_of(MAX_PAYLOAD_BYTES);
    notifier.notify(&largest).await.expect("7,999 bytes are sent");
    let got = listener.take(1).await;
    assert_eq!(got, vec![(channel.clone(), largest.clone())]);

    let small = |i: usize| Notification::for_event(&event("user", "s", i), Some(Position::new("log", 0, i as i64)));
    let batch = [small(1), notification_of(MAX_PAYLOAD_BYTES + 1), small(2)];
    match refusal(notifier.notify_batch(&batch).await.expect_err("refused")) {
        PgNotifyError::PayloadTooLarge { channel: c, bytes: 8_000, max: 7_999 } => assert_eq!(c, channel),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let got = listener.take(2).await;
    assert_eq!(got, vec![(channel.clone(), batch[0].clone()), (channel.clone(), batch[2].clone())]);
    listener.nothing_before(&channel).await;

    // A channel longer than an identifier: typed, and PostgreSQL agrees.
    let per_source = fx.notifier(ChannelScope::PerSource);
    let long = notification_of(200);
    match refusal(per_source.notify(&long).await.expect_err("refused")) {
        PgNotifyError::ChannelTooLong { bytes, max: 63, .. } => assert!(bytes > 63),
        other => panic!("expected ChannelTooLong, got {other:?}"),
    }
    let over = tokio::time::timeout(WAIT, fx.admin.query("SELECT pg_notify(repeat('c', 64), 'x')", &[])).await;
    assert_eq!(over.expect("answer").expect_err("64-byte channel refused").code().map(|c| c.code()), Some("22023"));

    // Through the publisher the event is stored all the same; only its
    // notification failed.
    let limits = Limits { max_source_id_len: 10_000, ..Limits::default() };
    let big = Event::builder("user.created", "user", "y".repeat(8_000)).limits(limits).build().expect("valid");
    let publisher = publisher(fx.sink().await, notifier);
    let receipt = publisher.publish(big).await.expect("stored");
    assert_eq!(receipt.position, Some(Position::new(fx.log(), 0, 1)));
    assert_eq!(receipt.notification, NotificationOutcome::Failed);
    listener.nothing_before(&channel).await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_gives_typed_errors_at_once() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let connection = ConnectionConfig {
        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        connect_timeout_ms: 2_000,
        reconnect_backoff_ms: 60_000,
    };
    let config = OutboxConfig { connection: connection.clone(), ..Default::default() };
    match tokio::time::timeout(WAIT, OutboxSink::connect(config)).await.expect("bounded") {
        Err(SetupError::Pg(PgError::Db(e))) => assert!(e.to_string().contains("connect"), "{e}"),
        other => panic!("expected a connection error, got {other:?}"),
    }
    let notifier = PgNotifier::new(PgNotifierConfig { connection, ..Default::default() }).expect("lazy");
    let n = Notification::for_event(&event("user", "a", 1), None);
    let first = tokio::time::timeout(WAIT, notifier.notify(&n)).await.expect("bounded").expect_err("refused");
    assert!(matches!(first, NotifyError::Connection(_)), "{first:?}");
    // Within the backoff the next call fails at once, without trying.
    let second = tokio::time::timeout(WAIT, notifier.notify(&n)).await.expect("bounded").expect_err("refused");
    assert!(matches!(&second, NotifyError::Connection(m) if m.contains("unavailable")), "{second:?}");
    assert!(second.is_retriable());
}
