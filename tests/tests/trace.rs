//! W3C trace context across both streams as OpenTelemetry spans (the `otel`
//! feature, docs/observability.md, "Trace context"). A binary of its own: the
//! metrics test beside it installs a process-wide recorder that would count
//! this test's deliveries.

use std::time::Duration;

use dualstream_tests::gateway::{user_event, Sse, TestGateway};
use serde_json::Value;

/// `POST /v1/events` of one event of `source`, with a `traceparent` header
/// and a bearer `token` if given.
async fn post_traced(gw: &TestGateway, token: Option<&str>, traceparent: &str, source: &str) -> reqwest::Response {
    let mut req = gw.http.post(format!("{}/v1/events", gw.base)).header("traceparent", traceparent);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.json(&user_event(source, 1)).send().await.expect("POST")
}

/// One event's spans, from the POST to two SSE deliveries (one live, one
/// caught up from Kafka), all in the trace of the request's `traceparent`,
/// with the SDK's in-memory exporter behind the tracing bridge
/// (docs/observability.md, "Trace context").
///
/// A current-thread runtime: the subscriber is this thread's default, and
/// every task of the in-process gateway runs on this thread.
#[tokio::test(flavor = "current_thread")]
async fn one_event_is_one_trace_from_the_post_to_the_sse_deliveries() {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt;

    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("dualstream-test"));
    let _default = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));

    let gw = TestGateway::start(|_| {}).await;
    let a = gw.channel("traced");
    let reader = format!("Bearer {}", gw.token(&[&a], &[]));
    let url = format!("{}/v1/stream?channel={}", gw.base, a.replace(':', "%3A"));
    let mut live = Sse::open(&gw.http, &url, &[("authorization", &reader)]).await;
    assert_eq!(live.status, 200, "{}", live.error);
    let subscribed = live.next(Duration::from_secs(10)).await.expect("subscribed");
    assert_eq!(subscribed.event, "subscribed");
    let before = subscribed.id.expect("a resume token before the event");

    let (trace_id, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let publisher = gw.token(&[], &["user"]);
    let r = post_traced(&gw, Some(&publisher), &format!("00-{trace_id}-{caller_span}-01"), "traced").await;
    assert_eq!(r.status().as_u16(), 200);
    let reply: Value = r.json().await.expect("JSON");
    let offset = reply["results"][0]["position"]["offset"].as_i64().expect("stored with a position");
    // Without a token that may publish, the request's trace context is not continued.
    let foreign = "5bf92f3577b34da6a3ce929d0e0e4737";
    for token in [None, Some(gw.token(&[&a], &[]))] {
        let r = post_traced(&gw, token.as_deref(), &format!("00-{foreign}-{caller_span}-01"), "traced").await;
        assert!([401, 403].contains(&r.status().as_u16()), "{}", r.status());
    }

    let got = live.next(Duration::from_secs(20)).await.expect("the live event");
    assert_eq!((got.event.as_str(), got.json()["position"]["offset"].as_i64()), ("event", Some(offset)));
    // A client resuming from before the event: caught up from Kafka.
    let mut resumed = Sse::open(&gw.http, &url, &[("authorization", &reader), ("last-event-id", &before)]).await;
    assert_eq!(resumed.status, 200, "{}", resumed.error);
    loop {
        let f = resumed.next(Duration::from_secs(20)).await.expect("the caught-up event");
        if f.event == "event" {
            assert_eq!(f.json()["position"]["offset"].as_i64(), Some(offset));
            break;
        }
    }

    // The notification's span ends when the notifier answers: wait for it.
    let want = 6; // POST, send, publish, receive and two process spans
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let all = exporter.get_finished_spans().expect("spans");
        let ours: Vec<_> = all.into_iter().filter(|s| s.span_context.trace_id().to_string() == trace_id).collect();
        if ours.len() >= want || std::time::Instant::now() > deadline {
            break ours;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let attr = |s: &opentelemetry_sdk::trace::SpanData, key: &str| {
        s.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
    };
    let all = exporter.get_finished_spans().expect("spans");
    let refused: Vec<_> =
        all.iter().filter(|s| s.name == "POST /v1/events" && s.parent_span_id.to_string() != caller_span).collect();
    assert_eq!(refused.len(), 2, "the two refused requests are server spans of their own");
    assert!(
        all.iter().all(|s| s.span_context.trace_id().to_string() != foreign),
        "a refused request's trace context was continued"
    );
    let named = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
    let server = named("POST /v1/events");
    assert_eq!(server.len(), 1, "one server span in the trace: {names:?}");
    assert_eq!(server[0].parent_span_id.to_string(), caller_span, "the POST continues the caller's trace");
    let send = named("send");
    assert_eq!(send.len(), 1, "{names:?}");
    let send = send[0];
    assert_eq!(send.parent_span_id, server[0].span_context.span_id(), "the event's send span is the request's child");
    assert_eq!(attr(send, "messaging.system").as_deref(), Some("kafka"));
    assert_eq!(attr(send, "messaging.destination.name").as_deref(), Some(gw.topic.as_str()));
    assert_eq!(attr(send, "messaging.kafka.offset"), Some(offset.to_string()), "the Kafka write's offset");
    let children = |name: &str| {
        named(name).into_iter().filter(|s| s.parent_span_id == send.span_context.span_id()).collect::<Vec<_>>()
    };
    let publish = children("publish");
    assert_eq!(publish.len(), 1, "the notification's span, under send: {names:?}");
    assert_eq!(attr(publish[0], "messaging.system").as_deref(), Some("redis"));
    assert_eq!(attr(publish[0], "dualstream.notification.outcome").as_deref(), Some("Sent"));
    let receive = children("receive");
    assert_eq!(receive.len(), 1, "the catch-up's read from Kafka, under send: {names:?}");
    assert_eq!(attr(receive[0], "messaging.kafka.offset"), Some(offset.to_string()));
    let mut delivered: Vec<String> =
        children("process").iter().map(|s| attr(s, "messaging.system").unwrap_or_default()).collect();
    delivered.sort();
    assert_eq!(delivered, ["kafka", "redis"], "one delivery live, one caught up: {names:?}");
    for s in children("process").into_iter().chain(children("receive")).chain(children("publish")) {
        assert_eq!(s.links.len(), 1, "{} links the producer's span as well", s.name);
        assert_eq!(s.links[0].span_context.span_id(), send.span_context.span_id());
    }
    for s in children("process") {
        assert_eq!(attr(s, "dualstream.channel").as_deref(), Some(a.as_str()));
    }
}

/// The gateway's `otlp` exporter (what its binary installs when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set) sends the spans of a traced POST to
/// an OTLP/HTTP collector: here a fake one that records each request.
#[tokio::test(flavor = "current_thread")]
async fn the_spans_of_a_traced_post_reach_an_otlp_collector() {
    use tracing_subscriber::layer::SubscriberExt;

    let collector = dualstream_tests::collector::FakeCollector::start();
    let provider = dualstream_gateway::telemetry::otlp_tracer(&collector.endpoint, "trace-test").expect("the exporter");
    let subscriber = tracing_subscriber::registry().with(dualstream_gateway::telemetry::layer(&provider));
    let default = tracing::subscriber::set_default(subscriber);

    let gw = TestGateway::start(|_| {}).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let publisher = gw.token(&[], &["user"]);
    let r = post_traced(&gw, Some(&publisher), &format!("00-{trace_id}-b7ad6b7169203331-01"), "exported").await;
    assert_eq!(r.status().as_u16(), 200);
    drop(default);
    let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await.expect("join");
    assert!(flushed.is_ok(), "the exporter's last batch: {flushed:?}");

    let raw_id: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).expect("hex")).collect();
    let mut bodies = Vec::new();
    for (path, body) in collector.received(Duration::from_secs(5)) {
        assert_eq!(path, "/v1/traces");
        bodies.push(body);
    }
    let all: Vec<u8> = bodies.concat();
    let has = |needle: &[u8]| all.windows(needle.len()).any(|w| w == needle);
    assert!(has(&raw_id), "no span of the request's trace among {} requests", bodies.len());
    for name in [&b"POST /v1/events"[..], b"send", b"messaging.kafka.offset", b"trace-test"] {
        assert!(has(name), "{:?} missing from the exported spans", String::from_utf8_lossy(name));
    }
}

/// A durable sink that keeps what it is given (no Kafka: this test is about
/// what the publisher writes into an event).
#[derive(Debug, Default)]
struct Kept(std::sync::Mutex<Vec<dualstream::Event>>);

#[async_trait::async_trait]
impl dualstream::DurableSink for Kept {
    async fn publish(&self, event: dualstream::Event) -> Result<dualstream::Position, dualstream::DeliveryError> {
        let mut kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        kept.push(event);
        Ok(dualstream::Position::new("kept", 0, kept.len() as i64 - 1))
    }
    async fn health_check(&self) -> Result<(), dualstream::SinkError> {
        Ok(())
    }
}

/// What `publish` writes into an event published inside a traced span: the
/// context of its own `send` span, a child of the caller's; and when the
/// `send` spans are filtered out, the caller's context itself, so the trace
/// still goes on downstream.
#[tokio::test(flavor = "current_thread")]
async fn a_published_event_carries_its_send_span_or_else_its_callers_context() {
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;

    for send_spans in [true, false] {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let targets = tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO).with_target(
            "dualstream_core::trace",
            if send_spans { tracing::Level::INFO } else { tracing::Level::ERROR },
        );
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("t")).with_filter(targets);
        let _default = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
        let sink = std::sync::Arc::new(Kept::default());
        let publisher = dualstream::DualPublisher::builder()
            .durable(sink.clone())
            .mode(dualstream::Mode::DurableOnly)
            .build()
            .expect("publisher");

        let caller = tracing::info_span!("caller");
        let caller_cx = caller.context().span().span_context().clone();
        assert!(caller_cx.is_valid(), "the caller's span has a context");
        let event = dualstream::Event::builder("t", "user", "u").build().expect("valid");
        let receipt = {
            use tracing::Instrument;
            publisher.publish(event).instrument(caller.clone()).await.expect("stored")
        };
        assert_eq!(receipt.position.map(|p| p.offset), Some(0));
        let kept = sink.0.lock().expect("kept").clone();
        let header = kept[0].headers().get("traceparent").cloned().expect("a traceparent header");
        let cx = dualstream::core::TraceContext::new(&header, None).expect("well-formed");
        assert_eq!(cx.trace_id(), caller_cx.trace_id().to_string(), "the caller's trace");
        let parent_is_caller = cx.span_id() == caller_cx.span_id().to_string();
        assert_eq!(parent_is_caller, !send_spans, "send spans on: {send_spans}, header {header}");
    }
}

/// A batch's `send` spans (`Traced::send_all`, which the engine's
/// `submit_many` and `publish_batch` call): without a caller's span, exactly
/// the events that carry their own context get one; a batch of events
/// without headers gets none (the untraced fast path); under a caller's span
/// every event gets one.
#[test]
fn a_batch_gets_send_spans_for_the_events_that_carry_a_context() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("t"));
    let _default = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let plain = || dualstream::Event::builder("t", "user", "u").build().expect("valid");
    let own = dualstream::core::TraceContext::new("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None)
        .expect("well-formed");
    let mut carrying = plain();
    carrying.set_trace_context(&own);
    let indices = |events: &mut Vec<dualstream::Event>| -> Vec<usize> {
        dualstream::core::Traced::send_all(events).into_iter().map(|(i, _)| i).collect()
    };

    let mut batch = vec![plain(), carrying.clone(), plain()];
    assert_eq!(indices(&mut batch), [1], "only the event with its own context");
    assert_ne!(
        batch[1].headers().get("traceparent").map(String::as_str),
        Some(own.traceparent()),
        "now the send span's"
    );
    assert_eq!(batch[0].headers().get("traceparent"), None);
    assert_eq!(indices(&mut vec![plain(), plain()]), Vec::<usize>::new(), "no trace under way");
    let caller = tracing::info_span!("caller");
    let _entered = caller.enter();
    assert_eq!(indices(&mut vec![plain(), plain()]), [0, 1], "under the caller's span");
}
