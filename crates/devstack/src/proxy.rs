//! A TCP proxy that delays every byte by a set time in each direction, for
//! slow-Redis tests and benchmarks (a far-away or overloaded Redis, without
//! touching the shared one) and for the chaos run, which changes the delay
//! and cuts every connection through it.
//!
//! Each direction of each connection is a reader that stamps what it reads
//! and a writer that forwards each chunk once its stamp is `delay` old, so
//! the delay adds latency but no bandwidth limit, and order is kept.
//!
//! A direction can also be held ([`DelayProxy::hold`]): what arrives is
//! still read and kept, in order, and forwarded on
//! [`release`](DelayProxy::release). Tests use it to order what two parties
//! see (a reply held while a command is sent, a command held while a reply
//! passes) without timing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A direction of the connections through a [`DelayProxy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the upstream server.
    ToServer,
    /// From the upstream server to the client.
    ToClient,
}

/// A running delay proxy. Stops (closing every connection) on drop.
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// The delay each way, in microseconds.
    delay_us: Arc<AtomicU64>,
    /// Whether each direction is held: `[ToServer, ToClient]`.
    held: [watch::Sender<bool>; 2],
}

impl DelayProxy {
    /// Listen on a free loopback port and forward to `upstream`, delaying
    /// each direction by `delay`. Binds before returning, so no other
    /// process can take the port in between.
    pub async fn start(upstream: SocketAddr, delay: Duration) -> std::io::Result<Self> {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await?, upstream, delay)
    }

    /// Like [`start`](Self::start), on a listener bound already (so that a
    /// broker can be told to advertise the proxy's address before it
    /// starts).
    pub fn start_on(listener: TcpListener, upstream: SocketAddr, delay: Duration) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let delay_us = Arc::new(AtomicU64::new(delay.as_micros() as u64));
        let held = [watch::Sender::new(false), watch::Sender::new(false)];
        let (conns, d) = (connections.clone(), delay_us.clone());
        let (to_server, to_client) = (held[0].clone(), held[1].clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let mut c = conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                c.retain(|t| !t.is_finished());
                c.push(tokio::spawn(pipe(cr, sw, d.clone(), to_server.subscribe())));
                c.push(tokio::spawn(pipe(sr, cw, d.clone(), to_client.subscribe())));
            }
        });
        Ok(Self { addr, task, connections, delay_us, held })
    }

    /// Stop forwarding in `direction`, on every connection (and those
    /// accepted later): what arrives is read and kept, in order, until
    /// [`release`](Self::release). A chunk being written when this is
    /// called still goes through.
    pub fn hold(&self, direction: Direction) {
        self.held[direction as usize].send_replace(true);
    }

    /// Forward in `direction` again, starting with what was kept.
    pub fn release(&self, direction: Direction) {
        self.held[direction as usize].send_replace(false);
    }

    /// Change the delay of every connection, from the next chunk on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us.store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Close every connection through the proxy at once (both ends see the
    /// connection drop); new connections are accepted as before. Returns how
    /// many connections were cut.
    pub fn cut(&self) -> usize {
        let mut c = self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = c.iter().filter(|t| !t.is_finished()).count() / 2;
        for t in c.drain(..) {
            t.abort();
        }
        n
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `redis://` URL through the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
        for c in self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            c.abort();
        }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_us: Arc<AtomicU64>,
    mut held: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at + Duration::from_micros(delay_us.load(Ordering::Relaxed))).await;
            if held.wait_for(|h| !*h).await.is_err() {
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proxy adds its delay each way and keeps the bytes in order.
    #[tokio::test]
    async fn delays_each_direction_and_keeps_order() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => s.write_all(&buf[..n]).await.expect("echo"),
                }
            }
        });
        let proxy = DelayProxy::start(upstream, Duration::from_millis(40)).await.expect("proxy");
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        let started = std::time::Instant::now();
        for i in 0..10u8 {
            c.write_all(&[i]).await.expect("write");
        }
        let mut got = vec![0u8; 10];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got)).await.expect("in time").expect("read");
        let rtt = started.elapsed();
        assert_eq!(got, (0..10).collect::<Vec<u8>>());
        assert!(rtt >= Duration::from_millis(80), "two delays of 40 ms: {rtt:?}");
    }
}
