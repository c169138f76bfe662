//! The one HTTP request traces need: a POST of a batch to the collector, sent and read on the
//! export thread (which has no async runtime), every step under the export timeout. HTTP/1.1,
//! one connection per batch, TLS with the public roots for `https://`.

use bytes::Bytes;
use http::{Request, Response};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Instant;

/// What can go wrong in a post: its words go in the export's warning.
pub type HttpError = Box<dyn std::error::Error + Send + Sync>;

/// The most of a collector's reply read (its partial-success message is small).
const MAX_REPLY: u64 = 1 << 20;

/// Posts `request`, blocking, and reads the whole reply, every step done by `deadline`.
///
/// # Errors
/// The endpoint cannot be reached or spoken to by then, or its reply is not HTTP.
pub fn post(request: &Request<Bytes>, deadline: Instant) -> Result<Response<Bytes>, HttpError> {
    let uri = request.uri();
    let host = uri.host().ok_or("the OTLP endpoint has no host")?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        other => {
            return Err(format!("the OTLP endpoint's scheme {other:?} is not http(s)").into());
        }
    };
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = connect(host, port, deadline)?;
    let head = head(request, host, uri.port_u16());
    if tls {
        let name =
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())?;
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connection = rustls::ClientConnection::new(Arc::new(config), name)?;
        exchange(
            rustls::StreamOwned::new(connection, tcp),
            &head,
            request.body(),
        )
    } else {
        exchange(tcp, &head, request.body())
    }
}

/// A connection to `host:port`, the socket's reads and writes bounded by `deadline`.
fn connect(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, HttpError> {
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or("the OTLP export timed out")
    };
    let mut last: Option<std::io::Error> = None;
    for address in (host.trim_matches(['[', ']']), port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, left()?) {
            Ok(stream) => {
                stream.set_read_timeout(Some(left()?))?;
                stream.set_write_timeout(Some(left()?))?;
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => format!("cannot connect to the collector at {host}:{port}: {e}").into(),
        None => format!("{host} resolves to no address").into(),
    })
}

/// The request line and headers.
fn head(request: &Request<Bytes>, host: &str, port: Option<u16>) -> String {
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut head = format!("{} {path} HTTP/1.1\r\nHost: {host}", request.method());
    if let Some(port) = port {
        head.push_str(&format!(":{port}"));
    }
    head.push_str(&format!(
        "\r\nContent-Length: {}\r\nConnection: close\r\n",
        request.body().len()
    ));
    for (name, value) in request.headers() {
        // Values the operator configured: one that would split the head is left out.
        if let Ok(value) = value.to_str()
            && !value.contains(['\r', '\n'])
        {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str("\r\n");
    head
}

/// Writes the request, reads the reply to its end (the connection closes), and parses it.
fn exchange<S: Read + Write>(
    mut stream: S,
    head: &str,
    body: &[u8],
) -> Result<Response<Bytes>, HttpError> {
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    let mut reply = Vec::new();
    let read = stream.take(MAX_REPLY).read_to_end(&mut reply);
    // A TLS peer that closes without close_notify still sent a whole reply.
    if let Err(e) = read
        && reply.is_empty()
    {
        return Err(e.into());
    }
    parse(&reply)
}

/// A reply: its status, and its body (de-chunked when sent in chunks).
fn parse(reply: &[u8]) -> Result<Response<Bytes>, HttpError> {
    let end = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the collector's reply has no end of headers")?;
    let head = std::str::from_utf8(&reply[..end])?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or("the collector's reply has no status")?;
    let mut chunked = false;
    let mut builder = Response::builder().status(status);
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("transfer-encoding")
                && value.eq_ignore_ascii_case("chunked")
            {
                chunked = true;
            }
            builder = builder.header(name.trim(), value);
        }
    }
    let rest = &reply[end + 4..];
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Ok(builder.body(Bytes::from(body))?)
}

/// The data of a chunked body (what is well-formed of it).
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let start = line_end + 2;
        // The size is the collector's word: a chunk past the reply ends the body.
        let chunk = size
            .filter(|size| *size > 0)
            .and_then(|size| rest.get(start..start.checked_add(size)?));
        let Some(chunk) = chunk else { break };
        body.extend_from_slice(chunk);
        rest = rest.get(start + chunk.len() + 2..).unwrap_or_default();
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_reply_is_read_whole_or_in_chunks() {
        let plain = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").expect("parses");
        assert_eq!(
            (plain.status().as_u16(), &plain.body()[..]),
            (200, &b"ok"[..])
        );
        let chunked = parse(
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n",
        )
        .expect("parses");
        assert_eq!(
            (chunked.status().as_u16(), &chunked.body()[..]),
            (400, &b"abc"[..])
        );
        assert!(parse(b"garbage").is_err());
    }

    #[test]
    fn a_collectors_hostile_chunk_size_ends_the_body_without_a_panic() {
        let reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nffffffffffffffff\r\nc\r\n";
        let parsed = parse(reply).expect("parses");
        assert_eq!(
            &parsed.body()[..],
            &b"ab"[..],
            "what came before the hostile size"
        );
    }

    #[test]
    fn a_header_value_cannot_split_the_request() {
        let request = Request::post("http://c:4318/v1/traces")
            .header("x-key", http::HeaderValue::from_static("v"))
            .body(Bytes::from_static(b"body"))
            .expect("request");
        let head = head(&request, "c", Some(4318));
        assert!(
            head.starts_with("POST /v1/traces HTTP/1.1\r\nHost: c:4318\r\n"),
            "{head}"
        );
        assert!(head.contains("Content-Length: 4\r\n") && head.ends_with("x-key: v\r\n\r\n"));
    }

    #[test]
    fn a_post_reaches_a_listener_and_its_reply_comes_back() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(b"spans") {
                let n = conn.read(&mut buf).expect("read");
                assert!(n > 0, "the request ended early");
                got.extend_from_slice(&buf[..n]);
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .expect("write");
            String::from_utf8_lossy(&got).into_owned()
        });
        let request = Request::post(format!("http://127.0.0.1:{port}/v1/traces"))
            .body(Bytes::from_static(b"spans"))
            .expect("request");
        let reply = post(&request, Instant::now() + Duration::from_secs(5)).expect("sent");
        assert_eq!(reply.status().as_u16(), 200);
        let seen = server.join().expect("server");
        assert!(seen.ends_with("\r\n\r\nspans"), "{seen}");
    }
}
