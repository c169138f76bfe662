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

from ._host import exchange

__all__ = ["HTTPError", "Response", "delete", "get", "patch", "post", "put", "request"]


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
    status, answer_headers, content = exchange(method, url, headers, payload, timeout)
    return Response(url, status, answer_headers, content)


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
