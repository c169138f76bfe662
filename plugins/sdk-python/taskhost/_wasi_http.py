"""The HTTP client's transport inside a plugin: one exchange over ``wasi:http``, through the
origins the operator granted (:mod:`taskhost.http` is the API)."""

from urllib.parse import urlsplit

from componentize_py_types import Err
from wit_world.imports import outgoing_handler, streams
from wit_world.imports import wasi_http_types as wasi

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


def exchange(method, url, headers, payload, timeout):
    """Sends one request and reads the whole answer: ``(status, headers, content)``, header
    names in lower case. A denied origin raises ``CapabilityDenied``, a timeout
    ``TimeoutError``, a failed connection ``ConnectionError``."""
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
    return status, headers, content
