//! Outbound HTTP for plugins (`wasi:http/outgoing-handler`): only to the origins the operator
//! granted the plugin, each request with timeouts no longer than the operator's. The check
//! runs on the final URI before any DNS lookup or connection, so a denied request never leaves
//! the host; a granted host name that resolves to a loopback, private or link-local address
//! is refused too, unless the grant names such an address or the plugin may reach its private
//! network (`allow_private_network`), so a name cannot be pointed at the worker's neighbours.
//! The request then goes to the addresses that were checked (`http_send.rs`), so a name cannot
//! answer the check with one address and the connection with another.

use super::limits::{LogBudget, MAX_CONCURRENT_REQUESTS};
use crate::config::{Grants, Origin};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// Longest time to establish a connection (a plugin may ask for less).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time to the first byte of the answer (a plugin may ask for less).
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest time between bytes of the answer (a plugin may ask for less).
const BETWEEN_BYTES_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest response body a plugin may receive; past it the body fails with
/// `HTTP-response-body-size`.
pub const RESPONSE_BODY_LIMIT: u64 = 16 * 1024 * 1024;

/// The per-task HTTP policy: which plugin is asking, what it was granted, how many of its
/// requests are in flight, and the task's log budget its denials are written within.
pub struct HttpPolicy {
    plugin: Arc<str>,
    task_id: Arc<str>,
    grants: Arc<Grants>,
    log_budget: Arc<Mutex<LogBudget>>,
    in_flight: Arc<AtomicUsize>,
}

impl HttpPolicy {
    pub fn new(
        plugin: Arc<str>,
        task_id: Arc<str>,
        grants: Arc<Grants>,
        log_budget: Arc<Mutex<LogBudget>>,
    ) -> Self {
        Self {
            plugin,
            task_id,
            grants,
            log_budget,
            in_flight: Arc::default(),
        }
    }

    /// Logs a denied or refused request, within the task's log budget.
    fn warn(&self, line: &str) {
        warn_within(&self.log_budget, &self.plugin, &self.task_id, line);
    }
}

fn warn_within(budget: &Mutex<LogBudget>, plugin: &str, task_id: &str, line: &str) {
    if let Some(line) = crate::lock(budget).take(line) {
        tracing::warn!(%plugin, %task_id, "{line}");
    }
}

/// Whether `ip` is this machine's or its network's, or not a unicast address of the public
/// internet: loopback, private, link-local, "this network" (0.0.0.0/8), broadcast, multicast,
/// shared (CGNAT), reserved, unique- and site-local; and an IPv6 address that carries an
/// IPv4 one (mapped, compatible, NAT64 64:ff9b::/96, 6to4 2002::/16) when that one is, and
/// Teredo (2001::/32), whose embedded address is obscured.
pub fn is_private(ip: std::net::IpAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr};
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                is_private(IpAddr::V4(Ipv4Addr::from(
                    (u32::from(hi) << 16) | u32::from(lo),
                )))
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x2001 && s[1] == 0)
                || (s[..6] == [0; 6] && embedded(s[6], s[7]))
                || (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && embedded(s[6], s[7]))
                || (s[0] == 0x2002 && embedded(s[1], s[2]))
        }
    }
}

/// The addresses `host` resolves to (an address resolves to itself), in the resolver's order.
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if addresses.is_empty() {
        return Err(format!("cannot resolve {host}: no address"));
    }
    Ok(addresses)
}

/// One request in flight, counted until its response body (or the failed request) is dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

type ResponseFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn Future<Output = Result<(), Error>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for HttpPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> ResponseFuture {
        let allowed = Origin::of(request.uri()).map(|origin| {
            let ok = self.grants.allows(&origin);
            (origin, ok)
        });
        let granted = match allowed {
            Ok((origin, true)) => origin,
            Ok((origin, false)) => {
                self.warn(&format!(
                    "denied HTTP request to {origin}: origin not granted to this plugin (allow_http in taskhost.toml)"
                ));
                return deny(request, Error::HttpRequestDenied);
            }
            Err(reason) => {
                self.warn(&format!(
                    "denied HTTP request to {}: {reason}",
                    request.uri()
                ));
                return deny(request, Error::HttpRequestDenied);
            }
        };
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_CONCURRENT_REQUESTS {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.warn(&format!(
                "refused HTTP request to {}: {MAX_CONCURRENT_REQUESTS} requests of this task are in flight already",
                request.uri()
            ));
            return deny(request, Error::ConnectionLimitReached);
        }
        let in_flight = InFlight(self.in_flight.clone());
        let options = capped(options.unwrap_or_default());
        let who = format!("plugin {} task {}", self.plugin, self.task_id);
        // A name, not an address the operator wrote, is checked for where it points.
        let check = !self.grants.allow_private_network;
        let budget = self.log_budget.clone();
        let (plugin, task_id) = (self.plugin.clone(), self.task_id.clone());
        Box::new(async move {
            let addresses = match checked_addresses(&granted, check).await {
                Ok(addresses) => addresses,
                Err(line) => {
                    warn_within(&budget, &plugin, &task_id, &line);
                    return Box::into_pin(deny(request, Error::HttpRequestDenied)).await;
                }
            };
            let (response, io) = super::http_send::send_to(request, &addresses, options).await?;
            Ok((
                response.map(|body| {
                    Capped::new(body, RESPONSE_BODY_LIMIT, who, in_flight).boxed_unsync()
                }),
                io,
            ))
        })
    }
}

/// A plugin's request timeouts, none longer than the operator's.
fn capped(asked: RequestOptions) -> RequestOptions {
    let at_most = |asked: Option<Duration>, ceiling: Duration| {
        Some(asked.map_or(ceiling, |asked| asked.min(ceiling)))
    };
    RequestOptions {
        connect_timeout: at_most(asked.connect_timeout, CONNECT_TIMEOUT),
        first_byte_timeout: at_most(asked.first_byte_timeout, FIRST_BYTE_TIMEOUT),
        between_bytes_timeout: at_most(asked.between_bytes_timeout, BETWEEN_BYTES_TIMEOUT),
    }
}

/// The addresses a granted origin's request goes to: those its host resolves to, once. With
/// `check`, a host name (not an address the operator wrote) resolving to any private address
/// is refused, saying why; the request then connects to these addresses, never to a second
/// lookup's.
async fn checked_addresses(granted: &Origin, check: bool) -> Result<Vec<SocketAddr>, String> {
    let host = granted.host.trim_matches(['[', ']']);
    let named = host.parse::<std::net::IpAddr>().is_err();
    let addresses = resolve(host, granted.port)
        .await
        .map_err(|reason| format!("denied HTTP request to {granted}: {reason}"))?;
    if check
        && named
        && let Some(ip) = addresses.iter().map(|a| a.ip()).find(|ip| is_private(*ip))
    {
        return Err(format!(
            "denied HTTP request to {granted}: the name resolves to {ip}, a private address \
             (grant the address itself, or set allow_private_network)"
        ));
    }
    Ok(addresses)
}

/// Answers a refused request with `error`. The request body the guest is writing is read
/// (and dropped) first: a guest client that writes the body while it waits for the answer
/// would otherwise see its body write fail ("connection reset") instead of the refusal.
fn deny(request: http::Request<WasiBody>, error: Error) -> ResponseFuture {
    Box::new(async move {
        let mut body = request.into_body();
        while let Some(Ok(_)) = body.frame().await {}
        Err(error)
    })
}

/// A response body that fails once more than `left` bytes came through; its request counts
/// as in flight until it is dropped.
struct Capped<B> {
    inner: B,
    left: u64,
    limit: u64,
    /// Whose response it is, for the log line when it is cut.
    who: String,
    _in_flight: InFlight,
}

impl<B> Capped<B> {
    fn new(inner: B, limit: u64, who: String, in_flight: InFlight) -> Self {
        Self {
            inner,
            left: limit,
            limit,
            who,
            _in_flight: in_flight,
        }
    }
}

impl<B> http_body::Body for Capped<B>
where
    B: http_body::Body<Data = bytes::Bytes, Error = Error> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
            if len > self.left {
                tracing::warn!(
                    "HTTP response body over the {} byte limit cut off ({})",
                    self.limit,
                    self.who
                );
                return std::task::Poll::Ready(Some(Err(Error::HttpResponseBodySize(Some(
                    self.limit,
                )))));
            }
            self.left -= len;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::is_private;

    #[test]
    fn loopback_private_link_local_and_unique_local_addresses_are_private() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "0.1.2.3",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "198.18.0.1",
            "ff02::1",
            "fec0::1",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        ] {
            assert!(is_private(ip.parse().expect(ip)), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "172.32.0.1",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!is_private(ip.parse().expect(ip)), "{ip}");
        }
    }
}
