//! Sending a plugin's granted request to the addresses the host resolved and checked, not to
//! whatever its name resolves to a moment later: the check and the connection see one answer,
//! so a name cannot pass the private-address check public and connect private (DNS
//! rebinding). Otherwise as `wasmtime_wasi_http::default_send_request`: HTTP/1.1, TLS with the
//! web's roots under the request's own name, and the request's timeouts.

use bytes::Bytes;
use http::uri::Scheme;
use http::{Request, Response};
use http_body::Body;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, RequestOptions};

trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T> Stream for T where T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}

/// What the connection lasts for once the response head arrived: drives the body to its end.
pub type Connection = Box<dyn Future<Output = Result<(), Error>> + Send>;

/// Sends `request` over a connection to one of `addresses` (tried in order), naming its own
/// host for TLS; `options` holds the timeouts, already capped by the caller.
pub async fn send_to(
    mut request: Request<impl Body<Data = Bytes, Error = Error> + Send + 'static>,
    addresses: &[SocketAddr],
    options: RequestOptions,
) -> Result<(Response<IncomingBody>, Connection), Error> {
    let uri = request.uri();
    let host = uri
        .host()
        .ok_or(Error::HttpRequestUriInvalid)?
        .trim_matches(['[', ']'])
        .to_owned();
    let use_tls = uri.scheme() == Some(&Scheme::HTTPS);
    let never = Duration::from_secs(600);
    let connect_timeout = options.connect_timeout.unwrap_or(never);
    let first_byte_timeout = options.first_byte_timeout.unwrap_or(never);
    // Tokio panics on a zero interval.
    let between_bytes_timeout = options
        .between_bytes_timeout
        .unwrap_or(never)
        .max(Duration::from_nanos(1));

    let stream = connect(addresses, &host, use_tls, connect_timeout).await?;
    let (mut sender, conn) = tokio::time::timeout(
        connect_timeout,
        hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)??;

    // Only a proxy is sent the scheme and authority; the host goes in the Host header.
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| Error::HttpRequestUriInvalid)?;

    let send = async move {
        let response = tokio::time::timeout(first_byte_timeout, sender.send_request(request))
            .await
            .map_err(|_| Error::ConnectionReadTimeout)??;
        let mut timeout = tokio::time::interval(between_bytes_timeout);
        timeout.reset();
        Ok::<_, Error>(response.map(|incoming| IncomingBody { incoming, timeout }))
    };
    let mut send = pin!(send);
    let mut conn = Some(conn);
    // The response head arrives only while the connection is driven.
    let response = poll_fn(|cx| match send.as_mut().poll(cx) {
        Poll::Ready(result) => Poll::Ready(result),
        Poll::Pending => {
            let Some(driving) = conn.as_mut() else {
                return Poll::Pending;
            };
            let ended = ready!(Pin::new(driving).poll(cx));
            conn = None;
            match ended {
                Ok(()) => send.as_mut().poll(cx),
                Err(e) => Poll::Ready(Err(Error::from(e))),
            }
        }
    })
    .await?;
    let rest: Connection = Box::new(async move {
        let Some(conn) = conn else { return Ok(()) };
        conn.await.map_err(|e| {
            if e.is_timeout() {
                Error::HttpResponseTimeout
            } else {
                Error::from(e)
            }
        })
    });
    Ok((response, rest))
}

/// A connection to one of `addresses`, in TLS under `host`'s name when `use_tls`.
async fn connect(
    addresses: &[SocketAddr],
    host: &str,
    use_tls: bool,
    connect_timeout: Duration,
) -> Result<Box<dyn Stream>, Error> {
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addresses)).await {
        Ok(stream) => stream.map_err(Error::Connect)?,
        Err(_) => return Err(Error::ConnectionTimeout),
    };
    Ok(if use_tls {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let name = server_name(host)?;
        let tls = tokio::time::timeout(connect_timeout, connector.connect(name, stream))
            .await
            .map_err(|_| Error::ConnectionTimeout)?
            .map_err(Error::Tls)?;
        Box::new(tls)
    } else {
        Box::new(stream)
    })
}

/// The name TLS checks the certificate against: the request's host, a name or an address.
fn server_name(host: &str) -> Result<rustls::pki_types::ServerName<'static>, Error> {
    use rustls::pki_types::ServerName;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(ServerName::from(ip));
    }
    ServerName::try_from(host)
        .map(|name| name.to_owned())
        .map_err(|e| Error::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))
}

/// A response body that fails when no byte arrives within the between-bytes timeout.
pub struct IncomingBody {
    incoming: hyper::body::Incoming,
    timeout: tokio::time::Interval,
}

impl Body for IncomingBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Error>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) if e.is_timeout() => {
                Poll::Ready(Some(Err(Error::HttpResponseTimeout)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Error::from(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                self.timeout.reset();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                ready!(self.timeout.poll_tick(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::send_to;
    use http_body_util::{BodyExt, Empty};
    use std::io::{Read, Write};
    use wasmtime_wasi_http::RequestOptions;

    /// The connection goes to the address given, whatever the name would resolve to: here a
    /// name that resolves nowhere, so a second lookup would fail the request.
    #[tokio::test]
    async fn a_request_connects_to_the_checked_address_not_to_its_name() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let address = listener.local_addr().expect("its address");
        let server = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().expect("a connection");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && socket.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .expect("an answer");
            String::from_utf8_lossy(&head).into_owned()
        });
        let request = http::Request::get("http://rebound.invalid/path?q=1")
            .header("host", "rebound.invalid")
            .body(Empty::<bytes::Bytes>::new().map_err(wasmtime_wasi_http::Error::from))
            .expect("a request");
        let (response, connection) = send_to(request, &[address], RequestOptions::default())
            .await
            .expect("sent to the given address");
        let driving = tokio::spawn(Box::into_pin(connection));
        let body = response
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        assert_eq!(&body[..], b"ok");
        let head = server.join().expect("the server");
        assert!(head.starts_with("GET /path?q=1 HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_lowercase().contains("host: rebound.invalid"),
            "{head}"
        );
        driving.abort();
    }
}
