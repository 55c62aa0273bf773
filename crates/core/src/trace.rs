//! W3C trace context carried by events, and the OpenTelemetry spans of
//! dualstream (docs/observability.md, "Trace context").
//!
//! An event carries its trace context as two headers with the W3C names,
//! [`TRACEPARENT`] and [`TRACESTATE`], the way OpenTelemetry's Kafka
//! instrumentations carry it in record headers. Its notification carries the
//! same two values (`traceparent`, `tracestate` in docs/wire-format.md), so a
//! subscriber on either stream can continue the trace.
//!
//! Without the `otel` feature this module only reads and writes those
//! values: a `traceparent` header a caller sets travels to Kafka and into
//! the notification untouched, and no span is made. With `otel`, every
//! [`Traced`] constructor makes a `tracing` span at INFO level (target
//! `dualstream_core::trace`) whose OpenTelemetry parent is the event's trace
//! context, so a `tracing-opentelemetry` layer exports them as one trace:
//!
//! | span | kind | made by | parent |
//! |---|---|---|---|
//! | `send` | producer | `DualPublisher::publish`, `publish_batch`, `BatchEngine::submit`, `submit_many` | the event's `traceparent`, else the caller's current span |
//! | `publish` | producer | the notification sent to Redis | the `send` span |
//! | `receive` | consumer | a catch-up join, or `Replay`, reading the event from Kafka | the `send` span |
//! | `process` | consumer | the gateway handing the event to a client | the `send` span |
//! | `POST /v1/events` | server | the gateway's ingest | the request's `traceparent` header |
//!
//! The `send` span's own context is what the event carries to Kafka and
//! Redis. An event with neither its own context nor a caller's span with one
//! gets no span and no header.

use std::sync::Arc;

use crate::event::Event;
#[cfg(feature = "otel")]
use crate::notification::{Notification, Position};

/// The record header (and notification field) of the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// The record header (and notification field) of the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";
/// The longest `tracestate` carried into a notification, in bytes (the W3C
/// recommendation); a longer one stays in the Kafka record only.
pub const MAX_TRACESTATE_LEN: usize = 512;
/// Whether dualstream was built with the `otel` feature (spans are made).
pub const ENABLED: bool = cfg!(feature = "otel");

/// A W3C trace context: a valid `traceparent` (version `00`) and an
/// optional `tracestate`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    traceparent: Arc<str>,
    tracestate: Option<Arc<str>>,
}

impl TraceContext {
    /// The context, if `traceparent` is well-formed
    /// (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, lower case,
    /// ids not all zero); a `tracestate` longer than [`MAX_TRACESTATE_LEN`]
    /// or holding a control character is left out. A malformed
    /// `traceparent` is ignored, as the W3C recommendation asks of a
    /// receiver: the trace restarts.
    pub fn new(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        if !is_traceparent(traceparent) {
            return None;
        }
        let tracestate = tracestate
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE_LEN && !s.chars().any(char::is_control))
            .map(Arc::from);
        Some(Self { traceparent: traceparent.into(), tracestate })
    }

    /// The trace context `event` carries in its headers, if any.
    pub fn of(event: &Event) -> Option<Self> {
        let headers = event.headers();
        if headers.is_empty() {
            return None;
        }
        let parent = headers.get(TRACEPARENT)?;
        Self::new(parent, headers.get(TRACESTATE).map(String::as_str))
    }

    /// The `traceparent` value.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` value, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id: 32 lower-case hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The id of the span that sent the event: 16 lower-case hex digits.
    pub fn span_id(&self) -> &str {
        &self.traceparent[36..52]
    }
}

/// Whether `s` is a W3C `traceparent` of version `00`.
pub fn is_traceparent(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let zero = |r: std::ops::Range<usize>| b[r].iter().all(|&c| c == b'0');
    b.len() == 55
        && b.starts_with(b"00-")
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
        && !zero(3..35)
        && !zero(36..52)
}

impl Event {
    /// Set the event's trace context: its [`TRACEPARENT`] and [`TRACESTATE`]
    /// headers (a `tracestate` the context lacks is removed). These two do
    /// not count against [`Limits::max_headers`](crate::Limits): the
    /// default limits leave room for them (docs/observability.md).
    pub fn set_trace_context(&mut self, cx: &TraceContext) {
        let headers = self.headers_mut();
        headers.insert(TRACEPARENT.to_owned(), cx.traceparent().to_owned());
        match cx.tracestate() {
            Some(s) => headers.insert(TRACESTATE.to_owned(), s.to_owned()),
            None => headers.remove(TRACESTATE),
        };
    }
}

/// One of dualstream's spans (the table at the top of this module). Only
/// made with the `otel` feature, and only for events with a trace context;
/// without the feature every constructor returns `None` and this type is
/// empty. The span ends when this is dropped or finished.
#[derive(Debug)]
pub struct Traced {
    /// Boxed: an `Option<Traced>` travels with every event through the
    /// engine, and a pointer keeps it one word where a span is four (the
    /// box is made only for an event that is traced).
    #[cfg(feature = "otel")]
    span: Box<tracing::Span>,
}

#[cfg(not(feature = "otel"))]
impl Traced {
    /// The `send` span of one event (always `None` without `otel`).
    #[inline(always)]
    pub fn send(_event: &mut Event) -> Option<Self> {
        None
    }
    /// The `send` spans of a batch, by index (always empty without `otel`).
    #[inline(always)]
    pub fn send_all(_events: &mut [Event]) -> Vec<(usize, Self)> {
        Vec::new()
    }
    /// The `publish` span of a notification (always `None` without `otel`).
    #[inline(always)]
    pub fn publish(_n: &crate::Notification) -> Option<Self> {
        None
    }
    /// The `receive` span of a catch-up read (always `None` without `otel`).
    #[inline(always)]
    pub fn receive(_event: &Event, _position: &crate::Position) -> Option<Self> {
        None
    }
    /// The `process` span of a delivery (always `None` without `otel`).
    #[inline(always)]
    pub fn process(
        _cx: Option<&TraceContext>,
        _position: &crate::Position,
        _from: &'static str,
        _channel: &str,
    ) -> Option<Self> {
        None
    }
    /// A server span continuing a request's trace (always `None` without `otel`).
    #[inline(always)]
    pub fn server(_name: &'static str, _traceparent: Option<&str>, _tracestate: Option<&str>) -> Option<Self> {
        None
    }
    /// Record where the event was stored.
    #[inline(always)]
    pub fn stored(self, _position: Option<&crate::Position>) {}
    /// Record a failure.
    #[inline(always)]
    pub fn failed(self, _error: &dyn std::fmt::Display) {}
    /// Record a notification's outcome.
    #[inline(always)]
    pub fn notified(self, _outcome: &dyn std::fmt::Debug) {}
    /// Run `fut` inside the span.
    #[inline(always)]
    pub async fn within<F: std::future::Future>(_this: Option<Self>, fut: F) -> F::Output {
        fut.await
    }
}

#[cfg(feature = "otel")]
impl Traced {
    /// The `send` span of one event: a producer span whose parent is the
    /// event's own trace context, or else the caller's current span. Its
    /// context replaces the event's trace headers. `None` when there is
    /// no parent with a context, or no OpenTelemetry layer records it.
    pub fn send(event: &mut Event) -> Option<Self> {
        Self::send_under(event, || otel::has_context(&tracing::Span::current()))
    }

    /// The `send` spans of a batch, with the index of each traced event:
    /// the caller's span is looked at once, and a batch with no trace costs
    /// no allocation.
    pub fn send_all(events: &mut [Event]) -> Vec<(usize, Self)> {
        let caller = otel::has_context(&tracing::Span::current());
        // The common case first: no trace under way and no event with headers.
        if !caller && events.iter().all(|e| e.headers().is_empty()) {
            return Vec::new();
        }
        events.iter_mut().enumerate().filter_map(|(i, e)| Self::send_under(e, || caller).map(|t| (i, t))).collect()
    }

    fn send_under(event: &mut Event, caller: impl FnOnce() -> bool) -> Option<Self> {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let own = TraceContext::of(event).and_then(|c| otel::remote(&c));
        if own.is_none() && !caller() {
            return None;
        }
        let span = tracing::info_span!(
            "send",
            otel.kind = "producer",
            messaging.system = "kafka",
            messaging.operation.type = "send",
            messaging.operation.name = "send",
            messaging.message.id = %event.id(),
            messaging.kafka.message.key = event.source().source_id(),
            messaging.destination.name = tracing::field::Empty,
            messaging.destination.partition.id = tracing::field::Empty,
            messaging.kafka.offset = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let own_given = own.is_some();
        if let Some(parent) = own {
            let _ = span.set_parent(parent);
        }
        let Some(cx) = otel::of_span(&span) else {
            // The `send` span is filtered out (or no layer records it): the
            // event still carries its caller's context, so the trace goes on
            // downstream without this hop.
            if !own_given {
                if let Some(caller) = otel::of_span(&tracing::Span::current()) {
                    event.set_trace_context(&caller);
                }
            }
            return None;
        };
        event.set_trace_context(&cx);
        Some(Self { span: Box::new(span) })
    }

    /// The `publish` span of a notification on the real-time path (Redis).
    pub fn publish(n: &Notification) -> Option<Self> {
        let parent = otel::remote(n.trace.as_ref()?)?;
        let span = tracing::info_span!(
            "publish",
            otel.kind = "producer",
            messaging.system = "redis",
            messaging.operation.type = "send",
            messaging.operation.name = "publish",
            messaging.message.id = %n.id,
            dualstream.source_type = &*n.source_type,
            dualstream.source_id = &*n.source_id,
            dualstream.notification.outcome = tracing::field::Empty,
        );
        otel::adopt(span, parent)
    }

    /// The `receive` span of a catch-up join reading `event` from Kafka.
    pub fn receive(event: &Event, position: &Position) -> Option<Self> {
        let parent = otel::remote(&TraceContext::of(event)?)?;
        let span = tracing::info_span!(
            "receive",
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "receive",
            messaging.operation.name = "catch-up",
            messaging.message.id = %event.id(),
            messaging.destination.name = &*position.topic,
            messaging.destination.partition.id = position.partition,
            messaging.kafka.offset = position.offset,
        );
        otel::adopt(span, parent)
    }

    /// The `process` span of one event handed to a client on `channel`;
    /// `from` says where the item came from (`kafka` or `redis`).
    pub fn process(cx: Option<&TraceContext>, position: &Position, from: &'static str, channel: &str) -> Option<Self> {
        let parent = otel::remote(cx?)?;
        let span = tracing::info_span!(
            "process",
            otel.kind = "consumer",
            messaging.system = from,
            messaging.operation.type = "process",
            messaging.operation.name = "deliver",
            messaging.destination.name = &*position.topic,
            messaging.destination.partition.id = position.partition,
            messaging.kafka.offset = position.offset,
            dualstream.channel = channel,
        );
        otel::adopt(span, parent)
    }

    /// A server span named `name`, continuing the request's `traceparent`
    /// when it is well-formed, else the root of a new trace.
    pub fn server(name: &'static str, traceparent: Option<&str>, tracestate: Option<&str>) -> Option<Self> {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let span = tracing::info_span!("server", otel.name = name, otel.kind = "server");
        if let Some(parent) = traceparent.and_then(|p| TraceContext::new(p, tracestate)).and_then(|c| otel::remote(&c))
        {
            let _ = span.set_parent(parent);
        }
        Some(Self { span: Box::new(span) })
    }

    /// Record where the event was stored (`None`: stored, the position
    /// unknown) and end the span.
    pub fn stored(self, position: Option<&Position>) {
        if let Some(p) = position {
            self.span.record("messaging.destination.name", &*p.topic);
            self.span.record("messaging.destination.partition.id", p.partition);
            self.span.record("messaging.kafka.offset", p.offset);
        }
    }

    /// Record a failure and end the span.
    pub fn failed(self, error: &dyn std::fmt::Display) {
        self.span.record("error.type", tracing::field::display(error));
        self.span.record("otel.status_code", "ERROR");
    }

    /// Record a notification's outcome and end the span.
    pub fn notified(self, outcome: &dyn std::fmt::Debug) {
        self.span.record("dualstream.notification.outcome", tracing::field::debug(outcome));
    }

    /// Run `fut` inside the span (its current span while polled).
    pub async fn within<F: std::future::Future>(this: Option<Self>, fut: F) -> F::Output {
        use tracing::Instrument;
        match this {
            Some(t) => fut.instrument(*t.span).await,
            None => fut.await,
        }
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use opentelemetry::Context;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{TraceContext, Traced};

    /// The OpenTelemetry context of a remote parent.
    pub(super) fn remote(cx: &TraceContext) -> Option<Context> {
        let p = cx.traceparent();
        let trace_id = TraceId::from_hex(&p[3..35]).ok()?;
        let span_id = SpanId::from_hex(&p[36..52]).ok()?;
        let flags = u8::from_str_radix(&p[53..55], 16).ok()?;
        let state = cx.tracestate().and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
        let sc = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
        Some(Context::new().with_remote_span_context(sc))
    }

    /// Whether `span` has an OpenTelemetry context (a layer records it and a
    /// trace is under way).
    pub(super) fn has_context(span: &tracing::Span) -> bool {
        !span.is_disabled() && span.context().span().span_context().is_valid()
    }

    /// The W3C context of `span`, if it has one.
    pub(super) fn of_span(span: &tracing::Span) -> Option<TraceContext> {
        if span.is_disabled() {
            return None;
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return None;
        }
        let traceparent = format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8());
        let state = sc.trace_state().header();
        TraceContext::new(&traceparent, Some(&state))
    }

    /// `span` under `parent`, and linked to it as OpenTelemetry's messaging
    /// conventions ask of consumer spans, if a layer records it.
    pub(super) fn adopt(span: tracing::Span, parent: Context) -> Option<Traced> {
        if span.is_disabled() {
            return None;
        }
        span.add_link(parent.span().span_context().clone());
        let _ = span.set_parent(parent);
        Some(Traced { span: Box::new(span) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn only_a_well_formed_traceparent_is_a_context() {
        let cx = TraceContext::new(P, Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(cx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.span_id(), "00f067aa0ba902b7");
        assert_eq!(cx.tracestate(), Some("congo=t61rcWkgMzE"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::new(bad, None).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_tracestate_too_long_or_with_control_characters_is_left_out() {
        let long = "a=".to_owned() + &"b".repeat(MAX_TRACESTATE_LEN - 1);
        assert_eq!(TraceContext::new(P, Some(&long)).expect("valid").tracestate(), None);
        let fits = "a=".to_owned() + &"b".repeat(MAX_TRACESTATE_LEN - 2);
        assert_eq!(TraceContext::new(P, Some(&fits)).expect("valid").tracestate(), Some(&*fits));
        assert_eq!(TraceContext::new(P, Some("a=b\n")).expect("valid").tracestate(), None);
    }

    #[test]
    fn an_event_carries_its_context_in_two_headers() {
        let mut e = Event::builder("t", "user", "u").header(TRACESTATE, "old=1").build().expect("valid");
        assert_eq!(TraceContext::of(&e), None, "a tracestate without a traceparent is no context");
        let cx = TraceContext::new(P, None).expect("valid");
        e.set_trace_context(&cx);
        assert_eq!(e.headers().get(TRACEPARENT).map(String::as_str), Some(P));
        assert!(!e.headers().contains_key(TRACESTATE), "a stale tracestate is removed");
        assert_eq!(TraceContext::of(&e), Some(cx));
    }

    #[cfg(not(feature = "otel"))]
    #[test]
    fn without_otel_no_span_is_made() {
        let mut e = Event::builder("t", "user", "u").header(TRACEPARENT, P).build().expect("valid");
        assert!(Traced::send(&mut e).is_none());
        assert_eq!(e.headers().get(TRACEPARENT).map(String::as_str), Some(P), "a caller's header travels untouched");
    }
}
