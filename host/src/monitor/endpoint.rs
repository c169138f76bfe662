//! The operator's HTTP endpoint (`--metrics-addr`): `GET /metrics` in Prometheus' text format,
//! `GET /healthz`, healthy only while the worker is really consuming (readiness), and
//! `GET /livez`, alive while none of its loops has stopped (liveness: what a restart mends; a
//! Redis outage is not). A deliberately small
//! HTTP/1.1 server: one request per connection, GET only, bounded reads and time, so a stuck
//! or hostile client costs one short-lived task and nothing else.

use super::control::BoxFuture;
use crate::shutdown::Stopping;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its request and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the worker is consuming, and if not, why.
#[derive(Debug, Clone)]
pub struct Health {
    /// Redis answers a PING.
    pub connected: bool,
    /// The fetch loop is working (fetches answered recently, or every slot busy).
    pub fetching: bool,
    /// The worker's heartbeat in Redis is fresh.
    pub heartbeat: bool,
    /// Supervised loops that stopped and are being started again (with their restarts).
    pub stopped_loops: Vec<String>,
}

impl Health {
    pub fn healthy(&self) -> bool {
        self.connected && self.fetching && self.heartbeat && self.alive()
    }

    /// Every loop of the worker runs: what a restart would mend is not broken.
    pub fn alive(&self) -> bool {
        self.stopped_loops.is_empty()
    }
}

/// What the endpoint reports.
pub trait Status: Send + Sync {
    /// The exposition text.
    fn metrics(&self) -> BoxFuture<'_, String>;
    fn health(&self) -> BoxFuture<'_, Health>;
}

/// Connections held at once. At the cap, a new connection displaces the oldest one held: an
/// idle or slow client can be pushed out by the next, but can never keep a probe waiting in
/// the listen queue (a probe sends its request at once and is answered in microseconds), and
/// no client can run the worker out of file descriptors.
pub const MAX_CONNECTIONS: usize = 32;

/// The connections being served, oldest first, so the oldest can be displaced.
#[derive(Default)]
struct Held {
    next: u64,
    open: std::collections::VecDeque<(u64, tokio::task::JoinHandle<()>)>,
}

/// Serves until `stop`.
pub async fn serve(listener: TcpListener, status: Arc<dyn Status>, mut stop: Stopping) {
    let held = Arc::new(std::sync::Mutex::new(Held::default()));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = crate::shutdown::stopped(&mut stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!("cannot accept a /metrics connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Displaced and closed before the next is served: the descriptors held stay bounded.
        while crate::lock(&held).open.len() >= MAX_CONNECTIONS {
            let oldest = crate::lock(&held).open.pop_front();
            if let Some((_, task)) = oldest {
                task.abort();
                let _ = task.await;
            }
        }
        let status = status.clone();
        let registry = held.clone();
        let mut guard = crate::lock(&held);
        let id = guard.next;
        guard.next += 1;
        let task = tokio::spawn(async move {
            if tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, status.as_ref()))
                .await
                .is_err()
            {
                tracing::debug!("a /metrics client timed out");
            }
            crate::lock(&registry).open.retain(|(open, _)| *open != id);
        });
        guard.open.push_back((id, task));
    }
    for (_, task) in crate::lock(&held).open.drain(..) {
        task.abort();
    }
}

/// A request head as it arrives. Only what arrived since the last look is searched for its
/// end (with the 3 bytes before it, where an end split across reads begins): linear in the
/// head, however a client cuts it up.
#[derive(Default)]
struct Head {
    bytes: Vec<u8>,
    /// Bytes looked at so far, all searches together.
    examined: usize,
}

impl Head {
    /// Adds `chunk`; whether the head is now complete (its blank line arrived).
    fn push(&mut self, chunk: &[u8]) -> bool {
        let from = self.bytes.len().saturating_sub(3);
        self.bytes.extend_from_slice(chunk);
        let fresh = &self.bytes[from..];
        self.examined += fresh.len();
        fresh.windows(4).any(|w| w == b"\r\n\r\n")
    }
}

async fn answer(mut stream: TcpStream, status: &dyn Status) {
    let mut head = Head::default();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let complete = head.push(&buf[..n]);
        if head.bytes.len() > MAX_HEAD {
            respond(&mut stream, 431, "text/plain", "request head too large\n").await;
            return;
        }
        if complete {
            break;
        }
    }
    let head = head.bytes;
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let text = status.metrics().await;
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &text,
            )
            .await;
        }
        ("GET", "/healthz") => {
            let health = status.health().await;
            let body = json!({
                "status": if health.healthy() { "ok" } else { "unhealthy" },
                "connected": health.connected,
                "fetching": health.fetching,
                "heartbeat": health.heartbeat,
                "stopped_loops": health.stopped_loops,
            })
            .to_string();
            let code = if health.healthy() { 200 } else { 503 };
            respond(&mut stream, code, "application/json", &(body + "\n")).await;
        }
        ("GET", "/livez") => {
            let health = status.health().await;
            let body = json!({
                "status": if health.alive() { "ok" } else { "stopped loops" },
                "stopped_loops": health.stopped_loops,
            })
            .to_string();
            let code = if health.alive() { 200 } else { 503 };
            respond(&mut stream, code, "application/json", &(body + "\n")).await;
        }
        (_, "/metrics" | "/healthz" | "/livez") => {
            respond(&mut stream, 405, "text/plain", "only GET is served\n").await;
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found: try /metrics, /healthz or /livez\n",
            )
            .await
        }
    }
}

async fn respond(stream: &mut TcpStream, code: u16, content_type: &str, body: &str) {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if stream.write_all(head.as_bytes()).await.is_ok() {
        let _ = stream.write_all(body.as_bytes()).await;
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::{Head, MAX_HEAD};

    /// A head sent a byte at a time is searched a few times its length, not its square.
    #[test]
    fn a_head_sent_byte_by_byte_is_read_in_linear_time() {
        let mut head = Head::default();
        let mut complete = false;
        for _ in 0..MAX_HEAD - 4 {
            complete |= head.push(b"a");
        }
        for byte in b"\r\n\r\n" {
            complete = head.push(&[*byte]);
        }
        assert!(complete, "the blank line ends the head");
        assert!(
            head.examined <= 4 * MAX_HEAD,
            "{} bytes examined for a head of {MAX_HEAD}",
            head.examined
        );
    }

    #[test]
    fn an_end_split_across_reads_is_found() {
        let mut head = Head::default();
        assert!(!head.push(b"GET /healthz HTTP/1.1\r\nHost: x\r"));
        assert!(!head.push(b"\n"));
        assert!(!head.push(b"\r"));
        assert!(head.push(b"\n"));
    }
}
