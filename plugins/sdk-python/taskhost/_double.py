"""The host's side when the SDK runs natively (under pytest): records what a task does, for
:class:`taskhost.testing.FakeHost` to show. Inside a plugin this module is never imported."""

import json
import uuid
from types import SimpleNamespace


class Err(Exception):
    """As componentize-py's: an error result, its value in ``value``."""

    def __init__(self, value):
        super().__init__(value)
        self.value = value


def _record(name, fields):
    def __init__(self, *args, **kwargs):
        values = dict(zip(fields, args))
        values.update(kwargs)
        for field in fields:
            setattr(self, field, values.get(field))

    return type(name, (), {"__init__": __init__, "__slots__": fields})


def _case(name):
    def __init__(self, value=None):
        self.value = value

    return type(name, (), {"__init__": __init__, "__slots__": ("value",)})


types = SimpleNamespace(
    TaskDefaults=_record("TaskDefaults", (
        "queue", "max_retries", "retry_backoff", "retry_backoff_max", "retry_jitter",
        "soft_time_limit", "time_limit", "rate_limit", "autoretry_for",
    )),
    TaskInfo=_record("TaskInfo", ("name", "defaults")),
    TaskError=_record("TaskError", ("kind", "message", "traceback")),
    RetryRequest=_record("RetryRequest", ("countdown", "reason")),
    Failure_Retry=_case("Failure_Retry"),
    Failure_Error=_case("Failure_Error"),
    Failure_Reject=_case("Failure_Reject"),
)


class _Handler:
    """The export's base class (the component's is generated)."""


exports = SimpleNamespace(Handler=_Handler)


class Recorded:
    """What the double holds: the config it serves, and what tasks did."""

    def __init__(self):
        self.config = {}
        self.progress = []
        self.logs = []
        self.sent = []
        # (METHOD, url) -> (status, headers, content); origins refused.
        self.responses = {}
        self.denied = set()
        self.requests = []


recorded = Recorded()


class _Level:
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


def _config(key):
    return recorded.config.get(key)


def _log(level, message, fields):
    recorded.logs.append((level, message))


def _update_state(state, meta):
    recorded.progress.append((state, json.loads(meta)))


def _send(signature):
    sent = json.loads(signature)
    recorded.sent.append(sent)
    kind = sent.get("subtask_type")
    if kind == "chord":
        body = sent["kwargs"]["body"]
        return body.get("options", {}).get("task_id") or str(uuid.uuid4())
    return sent.get("options", {}).get("task_id") or str(uuid.uuid4())


host = SimpleNamespace(
    Level=_Level, config=_config, log=_log, update_state=_update_state, send=_send,
)


def exchange(method, url, headers, payload, timeout):
    """Answers from the responses a test set (``FakeHost.respond``); an origin it denied
    raises ``CapabilityDenied``, any other request ``ConnectionError``."""
    from urllib.parse import urlsplit

    from . import CapabilityDenied

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    origin = f"{parts.scheme}://{parts.netloc}"
    recorded.requests.append((method.upper(), url, dict(headers), payload))
    if origin in recorded.denied:
        raise CapabilityDenied(f"{url}: this plugin is not allowed to reach that origin")
    answer = recorded.responses.get((method.upper(), url))
    if answer is None:
        raise ConnectionError(f"{url}: no fake response for {method.upper()} {url} "
                              "(FakeHost.respond)")
    return answer
