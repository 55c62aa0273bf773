//! The server loop of [`Gateway::serve`]: hyper's HTTP/1 connections with
//! a header read timeout, at most `limits.max_connections` at once (the
//! rest refused with a 503 before their request is read), dropped when a
//! write waits longer than twice `limits.send_timeout_ms` (at least 10 s),
//! and a graceful shutdown that closes streams and drains ingest.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{ApiError, GatewayError};
use crate::limits::{LimitError, PeerAddr};
use crate::wire::to_json;
use crate::Gateway;

impl Gateway {
    /// Serve on `listener` until `signal` completes, then shut down
    /// gracefully: streams are closed with a reconnect hint, ingest in
    /// flight finishes, and the batching engine flushes every accepted
    /// event and reports its outcome to its caller.
    ///
    /// At most `limits.max_connections` TCP connections are served at once
    /// (more are answered 503 and closed), and a connection that has not
    /// sent a complete request's headers within
    /// `limits.header_read_timeout_ms` of opening (or of its last response)
    /// is closed.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let limits = &self.state.config.limits;
        let router = self.router();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
            .max_buf_size(HTTP_BUFFER_BYTES);
        let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        let mut signal = std::pin::pin!(signal);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, mostly: wait for some to close.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut signal => break,
            };
            let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                tokio::spawn(refuse_connection(stream, limits.max_connections));
                continue;
            };
            let _ = stream.set_nodelay(true);
            // A client that stops reading: its subscriptions stop being
            // polled (a WebSocket one is closed as `slow_client` after
            // `send_timeout_ms`, if the close frame gets out). Once a write
            // has waited `write_timeout` the connection is dropped, and
            // whatever it holds is freed.
            let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
            stream.set_write_timeout(Some(write_timeout(limits.send_timeout_ms)));
            let stream = Box::pin(stream);
            let router = router.clone();
            let service = hyper::service::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                tower_service::Service::call(&mut router.clone(), req)
            });
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).with_upgrades();
            let mut shutdown = self.state.shutdown.subscribe();
            tokio::spawn(async move {
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                        // Finish the request in flight, then close.
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
                drop(permit);
            });
        }
        tracing::info!("shutting down: closing streams, draining ingest");
        let _ = self.state.shutdown.send(true);
        drop(listener);
        // Every connection holds a permit until it is done.
        let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
        let _ = connections.acquire_many(all).await;
        self.state.engine.shutdown().await;
        Ok(())
    }
}

/// The listening socket's backlog: connections the kernel completes before
/// the gateway accepts them. The standard library's and tokio's 128 is less
/// than a reconnect storm: past it the kernel drops a client's SYN, and the
/// client tries again after 1, 3, 7 s (its SYN retransmits), whatever the
/// gateway's load. The kernel caps it at `net.core.somaxconn` (4,096 since
/// Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4_096;

/// A listener on `addr` with a backlog of [`LISTEN_BACKLOG`], for
/// [`Gateway::serve`] (`tokio::net::TcpListener::bind` listens with 128).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The most hyper buffers for one connection, each way: a request whose
/// headers do not fit is refused (431), and a stream's writes wait for the
/// client's socket once this much is waiting for it. hyper's default (about
/// 400 KiB) would let every slow client hold that much of its items beyond
/// what its joins hold ready (`limits.client_buffer_bytes`).
pub const HTTP_BUFFER_BYTES: usize = 64 << 10;

/// How long a write to a connection may wait before the connection is
/// dropped: twice `send_timeout_ms`, at least 10 s, so that a WebSocket
/// client slow enough to be closed as `slow_client` still gets its close
/// frame when it reads again soon after, and an SSE client that pauses
/// reading for a few seconds is not dropped.
fn write_timeout(send_timeout_ms: u64) -> Duration {
    Duration::from_millis(send_timeout_ms.saturating_mul(2).max(10_000))
}

/// A 503 with `Retry-After` for a connection over `limits.max_connections`,
/// written without reading the request, then the connection is closed.
async fn refuse_connection(mut stream: tokio::net::TcpStream, limit: usize) {
    use tokio::io::AsyncWriteExt as _;
    let refusal = ApiError::from(LimitError::connections(limit));
    let (status, body) = (refusal.status(), to_json(&refusal.body()));
    let retry_after = refusal.retry_after_secs().unwrap_or(1);
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\nretry-after: {retry_after}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// Clients of a storm connect at once, before the gateway accepts any:
    /// with a backlog of 128 the 130th waits a second for its SYN's retry.
    #[tokio::test]
    async fn a_listener_completes_a_storm_of_connections_before_it_accepts_one() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4_096);
        let n = somaxconn.min(600) - 1;
        let listener = super::listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut held = Vec::with_capacity(n);
        for i in 0..n {
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_millis(500), connect).await {
                Ok(Ok(c)) => held.push(c),
                Ok(Err(e)) => panic!("connection {i}: {e}"),
                Err(_) => panic!("connection {i} of {n} waited over 500 ms: the backlog is full"),
            }
        }
        assert_eq!(held.len(), n);
    }
}
