//! The gateway against hostile clients, black-box over real HTTP on the real services: another site
//! using a browser's cookie (WebSocket, a form post), subscriptions left behind by their connection,
//! slowloris, oversized frames, the connection and rate limits, the anonymous dashboard feed, and
//! tickets used twice. Each test is an attack that worked before the limits and checks of issue #20.

use std::time::{Duration, Instant};

use dualstream_gateway::HTTP_BUFFER_BYTES;
use dualstream_tests::gateway::{user_event, Sse, TestGateway};
use dualstream_tests::{init_tracing, kafka_brokers, read_topic};
use futures::{SinkExt, StreamExt};
use proptest::prelude::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const EVIL: &str = "https://evil.example";

fn urlenc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A WebSocket upgrade with these headers: the socket, or the HTTP status and body it was refused with.
async fn ws_open(gw: &TestGateway, query: &str, headers: &[(&'static str, String)]) -> Result<Ws, (u16, Value)> {
    let mut req = format!("ws://{}/v1/ws{query}", gw.addr()).into_client_request().expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().expect("header"));
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body = r.body().as_deref().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
            Err((r.status().as_u16(), body))
        }
        Err(e) => panic!("ws connect: {e}"),
    }
}

async fn ws_send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.expect("send");
}

async fn ws_reply(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await.expect("a reply within 15 s") {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).expect("json"),
            Some(Ok(_)) => continue,
            other => panic!("the connection ended: {other:?}"),
        }
    }
}

fn code(v: &Value) -> Option<&str> {
    v["error"]["code"].as_str()
}

/// Poll the admin `/readyz` until the hub has `want` subscribers; the last count.
async fn hub_subscribers_reach(gw: &TestGateway, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = gw.readyz().await["hub"]["subscribers"].as_u64().expect("hub subscribers");
        if n == want || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_site_cannot_open_a_websocket_with_the_cookie() {
    init_tracing();
    let gw = TestGateway::start(|_| {}).await;
    let a = gw.channel("a");
    let cookie = format!("dualstream_token={}", gw.token(&[&a], &[]));
    let own = format!("http://{}", gw.addr());
    for (what, origin) in [("another site", Some(EVIL.to_owned())), ("no Origin", None), ("a sibling port", Some(format!("http://127.0.0.1:{}", gw.addr().port() + 1)))] {
        let mut headers = vec![("cookie", cookie.clone())];
        headers.extend(origin.map(|o| ("origin", o)));
        let (status, body) = ws_open(&gw, "", &headers).await.err().unwrap_or_else(|| panic!("{what}: upgraded"));
        assert_eq!((status, code(&body)), (403, Some("origin_not_allowed")), "{what}: {body}");
    }
    // Every upgrade is checked, whatever its credentials.
    let bearer = format!("Bearer {}", gw.token(&[&a], &[]));
    let (status, _) = ws_open(&gw, "", &[("authorization", bearer.clone()), ("origin", EVIL.into())]).await.expect_err("refused");
    assert_eq!(status, 403);
    // The gateway's own page may.
    let mut ws = ws_open(&gw, "", &[("cookie", cookie), ("origin", own)]).await.expect("same origin upgrades");
    ws_send(&mut ws, json!({"op": "subscribe", "channels": [&a]})).await;
    assert_eq!(ws_reply(&mut ws).await["kind"], "subscribed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_form_post_stores_nothing() {
    init_tracing();
    let gw = TestGateway::start(|_| {}).await;
    let cookie = format!("dualstream_token={}", gw.token(&[], &["user"]));
    let own = format!("http://{}", gw.addr());
    let body = user_event("a", 1).to_string();
    let post = |origin: Option<&str>, ct: &str| {
        let mut req = gw.http.post(format!("{}/v1/events", gw.base)).header("cookie", &cookie).header("content-type", ct);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let body = body.clone();
        async move {
            let r = req.body(body).send().await.expect("post");
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // What an HTML form on another site sends: no preflight, the victim's cookie.
    let (s, v) = post(Some(EVIL), "text/plain").await;
    assert_eq!((s, code(&v)), (403, Some("origin_not_allowed")), "{v}");
    let (s, v) = post(Some(EVIL), "application/json").await;
    assert_eq!((s, code(&v)), (403, Some("origin_not_allowed")), "{v}");
    let (s, v) = post(None, "application/json").await;
    assert_eq!((s, code(&v)), (403, Some("origin_not_allowed")), "a cookie POST without Origin: {v}");
    let (s, v) = post(Some(&own), "text/plain").await;
    assert_eq!((s, code(&v)), (415, Some("unsupported_media_type")), "{v}");
    // The gateway's own page, with JSON: stored, and the only record.
    let (s, v) = post(Some(&own), "application/json; charset=utf-8").await;
    assert_eq!(s, 200, "{v}");
    let records = read_topic(&kafka_brokers(), &gw.topic, 1, Duration::from_secs(15));
    assert_eq!(records.len(), 1, "a refused post was stored");
    // Two token cookies (one tossed in by a sibling domain): neither is trusted.
    let r = gw
        .http
        .post(format!("{}/v1/events", gw.base))
        .header("cookie", format!("{cookie}; dualstream_token=tossed"))
        .header("origin", &own)
        .json(&user_event("a", 2))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(code(&r.json::<Value>().await.expect("json")), Some("duplicate_cookie"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_connections_naming_a_channel_sixty_times_leave_no_subscriber_behind() {
    init_tracing();
    let gw = TestGateway::start(|c| {
        c.limits.max_streams_per_subject = 200;
        c.limits.max_streams_per_address = 200;
    })
    .await;
    let a = gw.channel("a");
    let baseline = gw.readyz().await["hub"]["subscribers"].as_u64().expect("subscribers");
    let query = std::iter::repeat_n(format!("channel={}", urlenc(&a)), 60).collect::<Vec<_>>().join("&");
    let url = format!("{}/v1/stream?{query}", gw.base);
    let auth = format!("Bearer {}", gw.token(&[&a], &[]));
    let opened = futures::stream::iter(0..100)
        .map(|_| async {
            let mut sse = Sse::open(&gw.http, &url, &[("authorization", &auth)]).await;
            assert_eq!(sse.status, 200, "{}", sse.error);
            let f = sse.next(Duration::from_secs(20)).await.expect("subscribed");
            assert_eq!(f.json()["subscriptions"], json!([&a]), "the name counts once");
            sse
        })
        .buffer_unordered(10)
        .collect::<Vec<_>>()
        .await;
    assert_eq!(gw.readyz().await["clients"]["sse"], 100);
    drop(opened);
    let left = hub_subscribers_reach(&gw, baseline).await;
    assert_eq!(left, baseline, "hub subscribers left behind by closed connections");
}

/// One step of a WebSocket client.
#[derive(Clone, Debug)]
enum Op {
    /// Subscribe to these of the test's channels (indices; repeats allowed) and maybe its pattern.
    Subscribe(Vec<usize>, bool),
    /// Unsubscribe from these.
    Unsubscribe(Vec<usize>, bool),
    /// Close the connection and open another.
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    let names = proptest::collection::vec(0usize..5, 0..8);
    prop_oneof![
        4 => (names.clone(), any::<bool>()).prop_map(|(n, p)| Op::Subscribe(n, p)),
        3 => (names, any::<bool>()).prop_map(|(n, p)| Op::Unsubscribe(n, p)),
        1 => Just(Op::Reconnect),
    ]
}

/// The channel of an index: 0 to 3 are `user` channels, 4 a `repo` channel outside the token's claims
/// (a subscribe naming it is refused whole).
fn channel_of(gw: &TestGateway, i: usize) -> String {
    if i == 4 { format!("{}:repo:x", gw.prefix) } else { gw.channel(&format!("p{i}")) }
}

/// Run the commands on one connection (a new one after `Reconnect`), checking each reply.
async fn run_ops(gw: &TestGateway, token: &str, ops: &[Op]) {
    let names = |idx: &[usize]| idx.iter().map(|i| channel_of(gw, *i)).collect::<Vec<_>>();
    let pattern = format!("{}:user:*", gw.prefix);
    let auth = [("authorization", format!("Bearer {token}"))];
    let mut ws = ws_open(gw, "", &auth).await.expect("upgrade");
    for op in ops {
        match op {
            Op::Subscribe(idx, p) => {
                let patterns: Vec<&String> = p.then_some(&pattern).into_iter().collect();
                ws_send(&mut ws, json!({"op": "subscribe", "channels": names(idx), "patterns": patterns})).await;
                let reply = ws_reply(&mut ws).await;
                let forbidden = idx.contains(&4);
                assert_eq!(reply["kind"], if forbidden { "error" } else { "subscribed" }, "{op:?}: {reply}");
            }
            Op::Unsubscribe(idx, p) => {
                let patterns: Vec<&String> = p.then_some(&pattern).into_iter().collect();
                ws_send(&mut ws, json!({"op": "unsubscribe", "channels": names(idx), "patterns": patterns})).await;
                assert_eq!(ws_reply(&mut ws).await["kind"], "subscribed");
            }
            Op::Reconnect => {
                drop(ws);
                ws = ws_open(gw, "", &auth).await.expect("upgrade");
            }
        }
    }
}

/// Whatever a client subscribes, unsubscribes and disconnects, the hub's subscribers return to
/// where they were once its connections are closed.
#[test]
fn hub_subscribers_return_to_baseline_after_any_command_sequence() {
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let gw = rt.block_on(TestGateway::start(|c| c.limits.commands_per_sec = 10_000));
    let token = gw.token(&[&format!("{}:user:*", gw.prefix)], &[]);
    let baseline = rt.block_on(gw.readyz())["hub"]["subscribers"].as_u64().expect("subscribers");
    let config = ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    runner
        .run(&proptest::collection::vec(op(), 1..12), |ops| {
            rt.block_on(run_ops(&gw, &token, &ops));
            let left = rt.block_on(hub_subscribers_reach(&gw, baseline));
            prop_assert_eq!(left, baseline, "hub subscribers after {:?}", ops);
            Ok(())
        })
        .expect("every sequence returns to the baseline");
}

/// Connect, send `bytes`, and read until the server closes; `None` when it has not closed within 20 s.
async fn closed_after(gw: &TestGateway, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(gw.addr()).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_within_the_header_timeout() {
    init_tracing();
    let gw = TestGateway::start(|c| c.limits.header_read_timeout_ms = 300).await;
    let partial = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ";
    let conns = (0..20).map(|i| closed_after(&gw, if i % 4 == 0 { b"" } else { partial }));
    for (i, closed) in futures::future::join_all(conns).await.into_iter().enumerate() {
        assert!(closed.is_some(), "connection {i} (partial headers or nothing) was still open after 20 s");
    }
    // A complete request is still answered.
    let r = gw.http.get(format!("{}/healthz", gw.base)).send().await.expect("healthz");
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_past_the_connection_buffer_are_refused() {
    init_tracing();
    let gw = TestGateway::start(|_| {}).await;
    let request = |pad: usize| {
        format!("GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: {}\r\nconnection: close\r\n\r\n", "x".repeat(pad))
    };
    let status = |got: &[u8]| String::from_utf8_lossy(&got[..got.len().min(12)]).into_owned();
    // Within the bound: answered.
    let ok = closed_after(&gw, request(HTTP_BUFFER_BYTES / 2).as_bytes()).await.expect("closed");
    assert_eq!(status(&ok), "HTTP/1.1 200");
    // Well past it (hyper checks the bound between reads, so a little more
    // gets in): refused with 431 (or, when the refusal races the rest of the
    // request, reset), never buffered and answered. hyper's default bound,
    // about 400 KiB, would answer it.
    let refused = closed_after(&gw, request(3 * HTTP_BUFFER_BYTES).as_bytes()).await.expect("closed");
    assert!(refused.is_empty() || status(&refused) == "HTTP/1.1 431", "{}", status(&refused));
}

/// A WebSocket opened by hand on a plain socket (to send frames no client library would), upgraded.
async fn raw_websocket(gw: &TestGateway, token: &str) -> TcpStream {
    let upgrade = format!(
        "GET /v1/ws HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        gw.addr()
    );
    let mut s = TcpStream::connect(gw.addr()).await.expect("connect");
    s.write_all(upgrade.as_bytes()).await.expect("upgrade");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.expect("response");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_websocket_frame_is_refused_from_its_header() {
    init_tracing();
    let gw = TestGateway::start(|c| c.limits.max_body_bytes = 4_096).await;
    let token = gw.token(&[&gw.channel("a")], &[]);
    let mut s = raw_websocket(&gw, &token).await;
    // A masked text frame that says it carries 2 MiB; only its first bytes follow. Before the limit
    // applied to frames, the gateway waited for (and buffered) all of it.
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(2u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[b'x'; 100]);
    s.write_all(&frame).await.expect("frame");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the connection stayed open waiting for the 2 MiB frame");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_connection_and_command_limits_refuse_with_typed_errors() {
    init_tracing();
    let gw = TestGateway::start(|c| {
        c.limits.max_streams_per_subject = 2;
        c.limits.max_streams_per_address = 3;
        c.limits.commands_per_sec = 1;
    })
    .await;
    let a = gw.channel("a");
    let url = format!("{}/v1/stream?channel={}", gw.base, urlenc(&a));
    let bearer = |sub: &str| {
        let claims = gw.gateway.auth().claims(Some(sub.into()), vec![a.clone()], vec![], 3_600);
        format!("Bearer {}", gw.token_with(&claims))
    };
    let open = |auth: String| {
        let (http, url) = (gw.http.clone(), url.clone());
        async move { Sse::open(&http, &url, &[("authorization", &auth)]).await }
    };
    // Per subject.
    let first = open(bearer("alice")).await;
    let _second = open(bearer("alice")).await;
    assert_eq!((first.status, _second.status), (200, 200));
    let r = gw.http.get(&url).header("authorization", bearer("alice")).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().contains_key("retry-after"), "a 429 says when to retry");
    let v: Value = r.json().await.expect("json");
    assert_eq!((code(&v), v["error"]["field"].as_str()), (Some("too_many_streams"), Some("limits.max_streams_per_subject")), "{v}");
    // Per address: a third subject's stream is this address's third, a fourth subject's is refused.
    let _third = open(bearer("bob")).await;
    assert_eq!(_third.status, 200);
    let fourth = open(bearer("carol")).await;
    assert_eq!((fourth.status, fourth.error["error"]["field"].as_str()), (429, Some("limits.max_streams_per_address")));
    // A closed stream frees its slot.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let again = open(bearer("alice")).await;
        if again.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the closed stream's slot was never freed: {}", again.error);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((_second, _third));

    // WebSocket commands: 1 a second with a burst of 1; 30 sent back to back.
    let gw2 = TestGateway::start(|c| c.limits.commands_per_sec = 1).await;
    let mut ws = ws_open(&gw2, "", &[("authorization", format!("Bearer {}", gw2.token(&[], &[])))]).await.expect("upgrade");
    for _ in 0..30 {
        ws_send(&mut ws, json!({"op": "unsubscribe", "channels": ["x"]})).await;
    }
    let mut limited = 0;
    for _ in 0..30 {
        let v = ws_reply(&mut ws).await;
        if v["code"] == "rate_limited" {
            assert_eq!(v["field"], "limits.commands_per_sec", "{v}");
            limited += 1;
        }
    }
    assert!(limited >= 20, "only {limited} of 30 back-to-back commands were refused at 1/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_a_503() {
    init_tracing();
    let gw = TestGateway::start(|c| c.limits.max_connections = 4).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(gw.addr()).await.expect("connect");
        // A complete request on each, so that each is known to be served.
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.expect("response");
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(s);
    }
    let refused = closed_after(&gw, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("answered and closed");
    let text = String::from_utf8_lossy(&refused);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("retry-after: 1") && text.contains("too_many_connections"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_is_refused_before_its_body_is_read() {
    init_tracing();
    let gw = TestGateway::start(|_| {}).await;
    let reader = gw.token(&[&gw.channel("a")], &[]);
    // Headers that announce 500 kB (under the body limit), and no body: the answer must not wait for it.
    let req = format!(
        "POST /v1/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {reader}\r\ncontent-type: application/json\r\n\
         content-length: 500000\r\nconnection: close\r\n\r\n"
    );
    let mut s = TcpStream::connect(gw.addr()).await.expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut buf))
        .await
        .expect("answered without the body")
        .expect("read");
    assert_eq!(&buf, b"HTTP/1.1 403");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_metrics_and_readiness_detail_need_an_admin_token() {
    init_tracing();
    let gw = TestGateway::start(|_| {}).await;
    let reader = format!("Bearer {}", gw.token(&[&gw.channel("a")], &["user"]));
    let admin = format!("Bearer {}", gw.admin_token());
    let get = |path: &str, auth: Option<&str>| {
        let mut req = gw.http.get(format!("{}{path}", gw.base));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        async move { req.send().await.expect("get").status().as_u16() }
    };
    assert_eq!(get("/v1/dashboard", None).await, 401, "the anonymous feed");
    assert_eq!(get("/v1/dashboard", Some(&reader)).await, 403, "a token without admin");
    assert_eq!(get("/metrics", None).await, 401);
    assert_eq!(get("/metrics", Some(&reader)).await, 403);
    assert_eq!(get("/healthz", None).await, 200);
    let anonymous: Value = gw.http.get(format!("{}/readyz", gw.base)).send().await.expect("readyz").json().await.expect("json");
    assert_eq!(anonymous, json!({"ready": true}), "readiness only, no detail");
    assert!(gw.readyz().await["hub"].is_object(), "the detail for the admin");
    let mut feed = Sse::open(&gw.http, &format!("{}/v1/dashboard", gw.base), &[("authorization", &admin)]).await;
    assert_eq!(feed.status, 200);
    assert_eq!(feed.next(Duration::from_secs(10)).await.expect("state").event, "state");
    // A dashboard ticket, for the page's EventSource: only from an admin token, once.
    let (s, _) = gw.ticket(&gw.token(&[&gw.channel("a")], &[]), &json!({"dashboard": true})).await;
    assert_eq!(s, 403);
    let (s, v) = gw.ticket(&gw.admin_token(), &json!({"dashboard": true})).await;
    assert_eq!(s, 200, "{v}");
    let url = format!("{}/v1/dashboard?ticket={}", gw.base, v["ticket"].as_str().expect("ticket"));
    assert_eq!(Sse::open(&gw.http, &url, &[]).await.status, 200);
    assert_eq!(Sse::open(&gw.http, &url, &[]).await.status, 401, "the ticket again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_opens_one_stream_of_what_it_names() {
    init_tracing();
    let gw = TestGateway::start(|_| {}).await;
    let (a, b) = (gw.channel("a"), gw.channel("b"));
    let token = gw.token(&[&format!("{}:user:*", gw.prefix)], &[]);
    let (s, v) = gw.ticket(&token, &json!({"channels": [&a]})).await;
    assert_eq!(s, 200, "{v}");
    let ticket = v["ticket"].as_str().expect("ticket").to_owned();
    let stream = |ch: &str, t: &str| format!("{}/v1/stream?channel={}&ticket={t}", gw.base, urlenc(ch));
    // Another channel than the one named: refused (and the ticket is spent on the attempt).
    let wrong = Sse::open(&gw.http, &stream(&b, &ticket), &[]).await;
    assert_eq!((wrong.status, code(&wrong.error)), (403, Some("forbidden")), "{}", wrong.error);
    let (_, v) = gw.ticket(&token, &json!({"channels": [&a]})).await;
    let ticket = v["ticket"].as_str().expect("ticket").to_owned();
    let mut first = Sse::open(&gw.http, &stream(&a, &ticket), &[]).await;
    assert_eq!(first.status, 200, "{}", first.error);
    assert_eq!(first.next(Duration::from_secs(10)).await.expect("subscribed").event, "subscribed");
    let again = Sse::open(&gw.http, &stream(&a, &ticket), &[]).await;
    assert_eq!((again.status, code(&again.error)), (401, Some("ticket_used")), "{}", again.error);
    let (status, body) = ws_open(&gw, &format!("?ticket={ticket}"), &[]).await.expect_err("refused");
    assert_eq!((status, code(&body)), (401, Some("ticket_used")));
    // A ticket names only what its token reads, and names something.
    let (s, v) = gw.ticket(&token, &json!({"channels": [format!("{}:repo:x", gw.prefix)]})).await;
    assert_eq!((s, code(&v)), (403, Some("forbidden")), "{v}");
    let (s, v) = gw.ticket(&token, &json!({})).await;
    assert_eq!((s, code(&v)), (400, Some("invalid_ticket_request")), "{v}");
}

/// Eight dashboards open for a few seconds make Kafka and Redis be checked about once a second in all,
/// not once a second each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_share_one_health_check_a_second() {
    init_tracing();
    let gw = TestGateway::start(|_| {}).await;
    let admin = format!("Bearer {}", gw.admin_token());
    let before = gw.readyz().await["health_checks"].as_u64().expect("health_checks");
    let started = Instant::now();
    let feeds = (0..8).map(|_| async {
        let mut feed = Sse::open(&gw.http, &format!("{}/v1/dashboard", gw.base), &[("authorization", &admin)]).await;
        assert_eq!(feed.status, 200, "{}", feed.error);
        for _ in 0..3 {
            assert_eq!(feed.next(Duration::from_secs(20)).await.expect("state").event, "state");
        }
    });
    futures::future::join_all(feeds).await;
    let checks = gw.readyz().await["health_checks"].as_u64().expect("health_checks") - before;
    let secs = started.elapsed().as_secs();
    // 24 states were sent; one check per second of wall time, plus the first and the last.
    assert!(checks <= secs + 2, "{checks} health checks in {secs} s for 8 viewers");
}

/// A token holder resuming from far back in a loop (each resume sends the
/// backfill readers to Kafka and the client everything in between) is held
/// to `limits.far_resumes_per_min`; other subjects, resumes near the end
/// and new subscriptions are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_resumes_are_limited_per_subject() {
    init_tracing();
    let gw = TestGateway::start(|c| {
        c.join.cache_records = 8;
        c.limits.far_resumes_per_min = 2;
    })
    .await;
    let a = gw.channel("far");
    let url = format!("{}/v1/stream?channel={}", gw.base, urlenc(&a));
    let bearer = |sub: &str| {
        let claims = gw.gateway.auth().claims(Some(sub.into()), vec![a.clone()], vec![], 3_600);
        format!("Bearer {}", gw.token_with(&claims))
    };
    let open = |auth: String, token: Option<String>| {
        let (http, url) = (gw.http.clone(), url.clone());
        async move {
            let mut headers = vec![("authorization", auth)];
            headers.extend(token.map(|t| ("last-event-id", t)));
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            Sse::open(&http, &url, &headers).await
        }
    };
    // A token at the channel's end; then 20 events, so it is 20 behind
    // where the gateway keeps 8.
    let mut first = open(bearer("mallory"), None).await;
    assert_eq!(first.status, 200, "{}", first.error);
    let subscribed = first.next(Duration::from_secs(10)).await.expect("subscribed");
    let old = subscribed.id.clone().expect("the subscribed item carries a resume token");
    drop(first);
    // One request each: tansu's high watermark is its last batch's base
    // offset + 1 (docs/operations.md), so one batch of 20 would put the end
    // at 1 and no resume would be far.
    let producer = gw.token(&[], &["user"]);
    for i in 0..20 {
        let (status, reply) = gw.ingest(&producer, &json!([user_event("far", i)])).await;
        assert_eq!((status, reply["stored"].as_u64()), (200, Some(1)), "{reply}");
    }

    // Two far resumes are the minute's share; the third is refused.
    let mut resumed = Vec::new();
    for i in 0..2 {
        let mut s = open(bearer("mallory"), Some(old.clone())).await;
        assert_eq!(s.status, 200, "far resume {i}: {}", s.error);
        let mut events = 0;
        while events < 20 {
            let f = s.next(Duration::from_secs(20)).await.expect("the resumed stream delivers what was missed");
            events += usize::from(f.event == "event");
        }
        resumed.push(s);
    }
    let r = gw
        .http
        .get(&url)
        .header("authorization", bearer("mallory"))
        .header("last-event-id", &old)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().expect("ascii").parse().expect("seconds");
    assert!((1..=30).contains(&retry), "one far resume comes back in 30 s: retry-after {retry}");
    let v: Value = r.json().await.expect("json");
    assert_eq!((code(&v), v["error"]["field"].as_str()), (Some("rate_limited"), Some("limits.far_resumes_per_min")), "{v}");
    assert_eq!(v["error"]["limit"], 2, "{v}");

    // Not counted: another subject's far resume, a new subscription, and a
    // resume from near the end.
    let bob = open(bearer("bob"), Some(old.clone())).await;
    assert_eq!(bob.status, 200, "another subject has its own share: {}", bob.error);
    let mut fresh = open(bearer("mallory"), None).await;
    assert_eq!(fresh.status, 200, "a new subscription is not a resume: {}", fresh.error);
    let near = fresh.next(Duration::from_secs(10)).await.expect("subscribed").id.expect("token");
    drop((fresh, bob));
    let near = open(bearer("mallory"), Some(near)).await;
    assert_eq!(near.status, 200, "a resume from the end is not far: {}", near.error);
    drop((near, resumed));

    // On a WebSocket the refusal is an error item, and nothing starts.
    let mut ws = ws_open(&gw, "", &[("authorization", bearer("mallory"))]).await.expect("upgrade");
    ws_send(&mut ws, json!({"op": "subscribe", "channels": [a], "resume": old})).await;
    let v = ws_reply(&mut ws).await;
    let got = (v["code"].as_str(), v["field"].as_str(), v["limit"].as_u64());
    assert_eq!(got, (Some("rate_limited"), Some("limits.far_resumes_per_min"), Some(2)), "{v}");
    assert!(v["retry_after_ms"].as_u64().is_some_and(|ms| ms >= 1_000), "{v}");
}

/// A masked text frame of `text`.
fn masked_text(text: &str) -> Vec<u8> {
    let mask = [7u8, 1, 200, 33];
    let mut frame = vec![0x81, 0x80 | 126];
    frame.extend_from_slice(&u16::try_from(text.len()).expect("under 64 KiB").to_be_bytes());
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The JSON of the next frame from the gateway: a final, unmasked text frame.
async fn read_text(s: &mut TcpStream) -> Value {
    let mut h = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(15), s.read_exact(&mut h)).await.expect("a reply").expect("read");
    assert_eq!(h[0], 0x81, "a final text frame");
    let len = match h[1] & 0x7f {
        126 => usize::from(s.read_u16().await.expect("length")),
        127 => usize::try_from(s.read_u64().await.expect("length")).expect("length"),
        n => usize::from(n),
    };
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.expect("the frame's body");
    serde_json::from_slice(&body).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_command_larger_than_the_read_buffer_is_read_whole() {
    // The gateway reads a WebSocket 4 KiB at a time (tungstenite's 128 KiB default was zero-filled
    // before every read attempt). A command of about 13 KiB, sent as one frame in pieces of 1 KiB
    // a few milliseconds apart, must still be read whole and answered, and a small one after it.
    init_tracing();
    let gw = TestGateway::start(|_| {}).await;
    let token = gw.token(&[&format!("{}:user:*", gw.prefix)], &[]);
    let mut s = raw_websocket(&gw, &token).await;

    let channels: Vec<String> = (0..60).map(|i| gw.channel(&format!("{i:03}-{}", "x".repeat(200)))).collect();
    let command = json!({"op": "subscribe", "channels": channels}).to_string();
    assert!(command.len() > 3 * 4_096, "{} bytes", command.len());
    for piece in masked_text(&command).chunks(1_024) {
        s.write_all(piece).await.expect("a piece");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reply = read_text(&mut s).await;
    assert_eq!(reply["kind"], "subscribed", "{reply}");
    let names: Vec<&str> =
        reply["subscriptions"].as_array().expect("subscriptions").iter().map(|c| c.as_str().expect("name")).collect();
    assert_eq!(names, channels, "every channel of the command was read (the names come sorted)");

    let small = gw.channel("small");
    s.write_all(&masked_text(&json!({"op": "subscribe", "channels": [small]}).to_string())).await.expect("send");
    let reply = read_text(&mut s).await;
    assert_eq!(reply["kind"], "subscribed", "{reply}");
    assert_eq!(reply["subscriptions"].as_array().map(Vec::len), Some(61), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_resume_is_paced_and_its_live_items_are_not() {
    // A client within its share of far resumes was sent its whole history as fast as its
    // connection took it; now that history comes at limits.far_items_per_sec, still exact, and
    // what comes after it (here mode=full, whose live items are read from Kafka too) is not paced.
    init_tracing();
    const PER_SEC: u64 = 20;
    let gw = TestGateway::start(|c| {
        c.join.cache_records = 8;
        c.limits.far_items_per_sec = PER_SEC as u32;
    })
    .await;
    let a = gw.channel("paced");
    let url = format!("{}/v1/stream?channel={}&mode=full", gw.base, urlenc(&a));
    let auth = format!("Bearer {}", gw.token(&[&a], &[]));
    let paced = |doc: &Value| doc["clients"]["far_items_paced"].as_u64().expect("clients.far_items_paced");
    let mut first = Sse::open(&gw.http, &url, &[("authorization", &auth)]).await;
    assert_eq!(first.status, 200, "{}", first.error);
    let old = first.next(Duration::from_secs(10)).await.expect("subscribed").id.expect("a resume token");
    drop(first);
    // One request each: tansu's high watermark is its last batch's base offset + 1.
    let producer = gw.token(&[], &["user"]);
    const FAR: u64 = 60;
    for i in 0..FAR {
        let (status, reply) = gw.ingest(&producer, &json!([user_event("paced", i)])).await;
        assert_eq!((status, reply["stored"].as_u64()), (200, Some(1)), "{reply}");
    }
    assert_eq!(paced(&gw.readyz().await), 0);

    // Two far resumes of the same token subject at once: they share one bucket, so a client
    // cannot get a fresh one by opening (or reconnecting) another stream.
    let mut other = Sse::open(&gw.http, &url, &[("authorization", &auth), ("last-event-id", &old)]).await;
    let mut s = Sse::open(&gw.http, &url, &[("authorization", &auth), ("last-event-id", &old)]).await;
    assert_eq!((s.status, other.status), (200, 200), "{} {}", s.error, other.error);
    let mut got = Vec::new();
    let mut got_other = Vec::new();
    while (got.len() as u64) < FAR || (got_other.len() as u64) < FAR {
        for (stream, into) in [(&mut s, &mut got), (&mut other, &mut got_other)] {
            if (into.len() as u64) < FAR {
                let f = stream.next(Duration::from_secs(30)).await.expect("a far resume delivers everything missed");
                if f.event == "event" {
                    into.push(f.json()["payload"]["n"].as_u64().expect("n"));
                }
            }
        }
    }
    assert_eq!(got, (0..FAR).collect::<Vec<_>>(), "exact, in order, despite the pacing");
    assert_eq!(got_other, got, "the other stream too");
    drop(other);
    let waited = paced(&gw.readyz().await);
    // The first second's worth goes at once; the rest of both streams' items waited for the
    // subject's bucket (one bucket per stream would have made 2 × 40 wait).
    assert!(waited >= 2 * FAR - PER_SEC - 10, "{waited} of 2 × {FAR} items waited; the burst is {PER_SEC}");

    // After the point the partition had reached when it resumed, nothing waits.
    const LIVE: u64 = 30;
    for i in FAR..FAR + LIVE {
        let (status, reply) = gw.ingest(&producer, &json!([user_event("paced", i)])).await;
        assert_eq!((status, reply["stored"].as_u64()), (200, Some(1)), "{reply}");
    }
    while (got.len() as u64) < FAR + LIVE {
        let f = s.next(Duration::from_secs(30)).await.expect("the live items");
        if f.event == "event" {
            got.push(f.json()["payload"]["n"].as_u64().expect("n"));
        }
    }
    assert_eq!(got, (0..FAR + LIVE).collect::<Vec<_>>());
    assert_eq!(paced(&gw.readyz().await), waited, "the live items were not paced");
}
