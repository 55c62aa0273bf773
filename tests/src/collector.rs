//! A fake OpenTelemetry collector: an OTLP/HTTP endpoint on loopback that
//! answers 200 to every request and hands each one's path and body to the
//! test (tests/trace.rs, tests/observability.rs).

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::Duration;

/// The collector: its endpoint (a base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT`
/// takes) and the requests it received.
#[derive(Debug)]
pub struct FakeCollector {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    rx: mpsc::Receiver<(String, Vec<u8>)>,
}

impl FakeCollector {
    /// Listen on a free port, in a thread of its own.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                while let Some(request) = read_request(&mut stream) {
                    if tx.send(request).is_err() {
                        return;
                    }
                }
            }
        });
        Self { endpoint, rx }
    }

    /// The requests received until none came for `quiet`: each one's path
    /// and body.
    pub fn received(&self, quiet: Duration) -> Vec<(String, Vec<u8>)> {
        std::iter::from_fn(|| self.rx.recv_timeout(quiet).ok()).collect()
    }
}

/// One request: the path and the body.
fn read_request(stream: &mut std::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let path = head.split_whitespace().nth(1)?.to_owned();
    let len: usize = head.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse().ok())??;
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
    stream.write_all(reply).ok()?;
    Some((path, buf[head_end..head_end + len].to_vec()))
}
