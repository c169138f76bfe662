//! A blocking HTTP client over `wasi:http`, for the main use of a plugin: call a service the
//! operator granted (`allow_http`), send JSON, read the answer.
//!
//! ```no_run
//! # fn example() -> taskhost_sdk::Result<serde_json::Value> {
//! use taskhost_sdk::http;
//! let answer = http::Request::post("http://executor:8000/execute")
//!     .json(&serde_json::json!({"code": "print(1)"}))?
//!     .send()?;
//! Ok(answer.json()?)
//! # }
//! ```
//!
//! A body is sent with `Content-Length` (a body of unknown length would go out chunked, which
//! some servers and proxies do not read). `?` on an [`HttpError`] fails the task with the kind
//! Python would raise: `CapabilityDenied` for an origin the operator did not grant,
//! `TimeoutError`, `ConnectionError`, `ValueError` for a URL that is not one.

use crate::error::Kind;
use std::time::Duration;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingResponse, Method, OutgoingBody, OutgoingRequest, RequestOptions,
    Scheme,
};
use wasip2::io::streams::StreamError;

/// The most one write may hand the host (wasi:io's blocking-write-and-flush limit).
const CHUNK: usize = 4096;

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The operator did not grant this plugin that origin.
    Denied(String),
    /// The connection or the answer took longer than the timeout.
    Timeout(String),
    /// No connection, or it broke.
    Connection(String),
    /// Not an `http://` or `https://` URL, or a header the host refuses.
    Invalid(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Denied(url) => {
                write!(f, "{url}: this plugin is not allowed to reach that origin")
            }
            Self::Timeout(what) | Self::Connection(what) | Self::Invalid(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for HttpError {}

impl HttpError {
    /// The exception type `.get()` raises for it (what `?` on it fails the task with).
    pub fn python_kind(&self) -> Kind {
        match self {
            Self::Denied(_) => Kind::CapabilityDenied,
            Self::Timeout(_) => Kind::TimeoutError,
            Self::Connection(_) => Kind::ConnectionError,
            Self::Invalid(_) => Kind::ValueError,
        }
    }
}

/// A whole answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Response {
    /// Whether the status is below 400.
    pub fn ok(&self) -> bool {
        self.status < 400
    }
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON (`null` for an empty body).
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return serde_json::from_str("null");
        }
        serde_json::from_slice(&self.body)
    }
}

/// One request, built then sent.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Option<Vec<u8>>,
    timeout: Duration,
}

impl Request {
    /// A request with `method` (`GET`, `POST`, ...) to `url`; 30 s timeout.
    pub fn new(method: &str, url: &str) -> Self {
        let method = match method.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_owned()),
        };
        Self {
            method,
            url: url.to_owned(),
            headers: Vec::new(),
            body: None,
            timeout: Duration::from_secs(30),
        }
    }
    /// `GET url`.
    pub fn get(url: &str) -> Self {
        Self::new("GET", url)
    }
    /// `POST url`.
    pub fn post(url: &str) -> Self {
        Self::new("POST", url)
    }
    /// `PUT url`.
    pub fn put(url: &str) -> Self {
        Self::new("PUT", url)
    }
    /// `DELETE url`.
    pub fn delete(url: &str) -> Self {
        Self::new("DELETE", url)
    }
    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
        self
    }
    /// Sends `value` as JSON (with its content type).
    pub fn json(self, value: &impl serde::Serialize) -> Result<Self, serde_json::Error> {
        let body = serde_json::to_vec(value)?;
        Ok(self.header("content-type", "application/json").body(body))
    }
    /// Sends `body` as it is.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }
    /// Bounds the connection and each wait for the answer (the operator's timeouts are
    /// ceilings).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends the request and reads the whole answer (whatever its status).
    pub fn send(self) -> Result<Response, HttpError> {
        let (scheme, authority, path) = split_url(&self.url)?;
        let mut headers = self.headers.clone();
        if let Some(body) = &self.body {
            headers.push(("content-length".into(), body.len().to_string().into_bytes()));
        }
        let invalid = |what: &str| HttpError::Invalid(format!("{}: {what}", self.url));
        let fields = Fields::from_list(&headers).map_err(|e| invalid(&format!("{e:?}")))?;
        let request = OutgoingRequest::new(fields);
        let set = request.set_method(&self.method).is_ok()
            && request.set_scheme(Some(&scheme)).is_ok()
            && request.set_authority(Some(authority)).is_ok()
            && request.set_path_with_query(Some(path)).is_ok();
        if !set {
            return Err(invalid(
                "the host refused the method, scheme, authority or path",
            ));
        }
        let options = RequestOptions::new();
        let nanos = u64::try_from(self.timeout.as_nanos()).unwrap_or(u64::MAX);
        // The host keeps its own ceilings: a refused setting leaves them.
        let _ = options.set_connect_timeout(Some(nanos));
        let _ = options.set_first_byte_timeout(Some(nanos));
        let _ = options.set_between_bytes_timeout(Some(nanos));
        // The body is taken before the request goes and written after: the host reads it as
        // it is written.
        let outgoing = match &self.body {
            Some(_) => Some(request.body().map_err(|()| invalid("no body"))?),
            None => None,
        };
        let future = outgoing_handler::handle(request, Some(options))
            .map_err(|code| error(&self.url, &code))?;
        if let (Some(outgoing), Some(body)) = (outgoing, &self.body) {
            write_body(outgoing, body, &self.url)?;
        }
        future.subscribe().block();
        let answer = match future.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(error(&self.url, &code)),
            Some(Err(())) | None => {
                return Err(HttpError::Connection(format!("{}: no answer", self.url)));
            }
        };
        read_answer(&answer, &self.url)
    }
}

/// `GET url`, answered.
pub fn get(url: &str) -> Result<Response, HttpError> {
    Request::get(url).send()
}

/// `POST url` with `value` as JSON, answered.
pub fn post_json(url: &str, value: &impl serde::Serialize) -> Result<Response, HttpError> {
    Request::post(url)
        .json(value)
        .map_err(|e| HttpError::Invalid(format!("{url}: the body is not JSON: {e}")))?
        .send()
}

fn split_url(url: &str) -> Result<(Scheme, &str, &str), HttpError> {
    let invalid = || HttpError::Invalid(format!("not an http(s) URL: {url:?}"));
    let (scheme, rest) = url.split_once("://").ok_or_else(invalid)?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return Err(invalid()),
    };
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    if authority.is_empty() {
        return Err(invalid());
    }
    Ok((scheme, authority, if path.is_empty() { "/" } else { path }))
}

fn error(url: &str, code: &ErrorCode) -> HttpError {
    match code {
        ErrorCode::HttpRequestDenied => HttpError::Denied(url.to_owned()),
        ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout
        | ErrorCode::HttpResponseTimeout
        | ErrorCode::DnsTimeout => HttpError::Timeout(format!("{url}: {code:?}")),
        other => HttpError::Connection(format!("{url}: {other:?}")),
    }
}

fn write_body(outgoing: OutgoingBody, body: &[u8], url: &str) -> Result<(), HttpError> {
    let broken = |e: StreamError| HttpError::Connection(format!("{url}: sending the body: {e:?}"));
    {
        let stream = outgoing
            .write()
            .map_err(|()| HttpError::Connection(format!("{url}: no body stream")))?;
        for chunk in body.chunks(CHUNK) {
            stream.blocking_write_and_flush(chunk).map_err(broken)?;
        }
    }
    OutgoingBody::finish(outgoing, None).map_err(|code| error(url, &code))
}

fn read_answer(answer: &IncomingResponse, url: &str) -> Result<Response, HttpError> {
    let status = answer.status();
    let headers = answer.headers().entries();
    let incoming = answer
        .consume()
        .map_err(|()| HttpError::Connection(format!("{url}: the answer has no body")))?;
    let mut body = Vec::new();
    {
        let stream = incoming
            .stream()
            .map_err(|()| HttpError::Connection(format!("{url}: the answer has no body")))?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(e) => {
                    return Err(HttpError::Connection(format!(
                        "{url}: reading the answer: {e:?}"
                    )));
                }
            }
        }
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_splits_into_scheme_authority_and_path() {
        let (scheme, authority, path) =
            split_url("http://127.0.0.1:8000/execute?x=1").expect("a URL");
        assert!(matches!(scheme, Scheme::Http));
        assert_eq!((authority, path), ("127.0.0.1:8000", "/execute?x=1"));
        assert_eq!(split_url("https://host").expect("a URL").2, "/");
    }

    #[test]
    fn what_is_not_an_http_url_is_a_value_error() {
        let error = split_url("ftp://host/x").expect_err("not http");
        assert_eq!(error.python_kind(), Kind::ValueError);
    }
}
