"""A small HTTP client for plugins, over ``wasi:http``: only to the origins the operator granted
the plugin (``allow_http``), with the operator's timeouts as ceilings.

``requests`` and ``urllib`` do not work in a plugin: there are no sockets, and the runtime has
no zlib. This client sends a body of known length with ``Content-Length`` and reads the whole
answer::

    from taskhost import http
    answer = http.post(url, json={"code": code}, timeout=30)
    answer.raise_for_status()
    return answer.json()

Errors: a denied origin raises ``taskhost.CapabilityDenied``; a failed connection raises
``ConnectionError`` (``TimeoutError`` for a timeout); ``raise_for_status`` raises ``HTTPError``.
"""

import json as _json
from urllib.parse import urlsplit

from componentize_py_types import Err
from wit_world.imports import outgoing_handler, streams
from wit_world.imports import wasi_http_types as wasi

__all__ = ["HTTPError", "Response", "delete", "get", "patch", "post", "put", "request"]

_METHODS = {
    "GET": wasi.Method_Get,
    "HEAD": wasi.Method_Head,
    "POST": wasi.Method_Post,
    "PUT": wasi.Method_Put,
    "DELETE": wasi.Method_Delete,
    "OPTIONS": wasi.Method_Options,
    "PATCH": wasi.Method_Patch,
}

# The most one write may hand the host (wasi:io's blocking-write-and-flush limit).
_CHUNK = 4096
_TIMEOUTS = (
    wasi.ErrorCode_ConnectionTimeout,
    wasi.ErrorCode_ConnectionReadTimeout,
    wasi.ErrorCode_ConnectionWriteTimeout,
    wasi.ErrorCode_HttpResponseTimeout,
    wasi.ErrorCode_DnsTimeout,
)


class HTTPError(Exception):
    """An answer with a 4xx or 5xx status (from ``Response.raise_for_status``)."""

    def __init__(self, message, response):
        super().__init__(message)
        self.response = response


class Response:
    """A whole answer: ``status_code``, ``headers`` (lower-case names), ``content`` (bytes)."""

    def __init__(self, url, status_code, headers, content):
        self.url = url
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def ok(self):
        return self.status_code < 400

    @property
    def text(self):
        return self.content.decode("utf-8", errors="replace")

    def json(self):
        return _json.loads(self.content) if self.content.strip() else None

    def raise_for_status(self):
        if self.status_code >= 400:
            kind = "Client" if self.status_code < 500 else "Server"
            raise HTTPError(f"{self.status_code} {kind} Error for url: {self.url}", self)

    def __repr__(self):
        return f"<Response [{self.status_code}]>"


def _denied_or_failed(code, url):
    from . import CapabilityDenied

    if isinstance(code, wasi.ErrorCode_HttpRequestDenied):
        return CapabilityDenied(f"{url}: this plugin is not allowed to reach that origin")
    if isinstance(code, _TIMEOUTS):
        return TimeoutError(f"{url}: {type(code).__name__.removeprefix('ErrorCode_')}")
    return ConnectionError(f"{url}: {type(code).__name__.removeprefix('ErrorCode_')}")


def _outgoing(method, url, headers, length):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    entries = [(k.lower(), str(v).encode()) for k, v in (headers or {}).items()]
    if length is not None:
        entries.append(("content-length", str(length).encode()))
    try:
        fields = wasi.Fields.from_list(entries)
    except Err as e:
        raise ValueError(f"bad header: {e.value}") from None
    req = wasi.OutgoingRequest(fields)
    verb = _METHODS.get(method.upper())
    req.set_method(verb() if verb else wasi.Method_Other(method.upper()))
    req.set_scheme(wasi.Scheme_Https() if parts.scheme == "https" else wasi.Scheme_Http())
    req.set_authority(parts.netloc)
    req.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    return req


def _write_body(body, payload):
    stream = body.write()
    try:
        for start in range(0, len(payload), _CHUNK):
            stream.blocking_write_and_flush(payload[start:start + _CHUNK])
    except Err:
        raise ConnectionError("the request body could not be sent") from None
    finally:
        stream.__exit__(None, None, None)
    wasi.OutgoingBody.finish(body, None)


def _read_all(response, url):
    body = response.consume()
    stream = body.stream()
    chunks = []
    try:
        while True:
            try:
                chunks.append(stream.blocking_read(65536))
            except Err as e:
                if isinstance(e.value, streams.StreamError_Closed):
                    break
                raise ConnectionError(f"{url}: reading the answer failed") from None
    finally:
        stream.__exit__(None, None, None)
    return b"".join(chunks)


def request(method, url, *, json=None, data=None, headers=None, timeout=30.0):
    """Sends one request and reads the whole answer. ``json`` is sent as JSON (with its
    content type), ``data`` as bytes or text; ``timeout`` (seconds) bounds the connection and
    each wait for the answer."""
    headers = dict(headers or {})
    payload = None
    if json is not None:
        payload = _json.dumps(json).encode()
        headers.setdefault("content-type", "application/json")
    elif data is not None:
        payload = data.encode() if isinstance(data, str) else bytes(data)
    req = _outgoing(method, url, headers, None if payload is None else len(payload))
    options = None
    if timeout is not None:
        options = wasi.RequestOptions()
        nanos = int(float(timeout) * 1e9)
        for setter in (options.set_connect_timeout, options.set_first_byte_timeout,
                       options.set_between_bytes_timeout):
            try:
                setter(nanos)
            except Err:
                pass  # the host keeps its own ceiling
    # The body is taken before the request goes, and written after: the host reads it as it
    # is written.
    body = req.body() if payload is not None else None
    try:
        future = outgoing_handler.handle(req, options)
    except Err as e:
        raise _denied_or_failed(e.value, url) from None
    if body is not None:
        _write_body(body, payload)
    return _answer(future, url)


def _answer(future, url):
    pollable = future.subscribe()
    pollable.block()
    pollable.__exit__(None, None, None)
    outcome = future.get()
    future.__exit__(None, None, None)
    if outcome is None:
        raise ConnectionError(f"{url}: no answer")
    inner = outcome.value
    if isinstance(outcome, Err) or inner is None:
        raise ConnectionError(f"{url}: the answer was already taken")
    if isinstance(inner, Err):
        raise _denied_or_failed(inner.value, url)
    response = inner.value
    status = response.status()
    fields = response.headers()
    headers = {k.lower(): v.decode("latin-1") for k, v in fields.entries()}
    fields.__exit__(None, None, None)
    content = _read_all(response, url)
    response.__exit__(None, None, None)
    return Response(url, status, headers, content)


def get(url, **kwargs):
    return request("GET", url, **kwargs)


def post(url, **kwargs):
    return request("POST", url, **kwargs)


def put(url, **kwargs):
    return request("PUT", url, **kwargs)


def patch(url, **kwargs):
    return request("PATCH", url, **kwargs)


def delete(url, **kwargs):
    return request("DELETE", url, **kwargs)
