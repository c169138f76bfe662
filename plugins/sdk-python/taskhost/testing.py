"""Testing a plugin's tasks natively, under pytest, with a test double for the host: the
config values you give it, and the progress, log lines, sent tasks and HTTP requests it
records for your asserts. Install the SDK into the virtualenv your tests run in
(``pip install <taskhost>/plugins/sdk-python pytest``); ``app.py`` then imports as it does in
the plugin::

    from taskhost.testing import FakeHost
    import app

    def test_add():
        assert FakeHost().run(app.add, 2, 3) == 5

    def test_fetch_reports_progress():
        host = FakeHost(config={"base_url": "http://api"})
        host.respond("GET", "http://api/items", json={"n": 1})
        assert host.run(app.fetch, "/items") == {"n": 1}
        assert host.progress == [("PROGRESS", {"path": "/items"})]

``run`` calls the task as the worker would: arguments bound as Celery binds them, the result
through JSON; what the task raises is raised (``taskhost.Retry`` for a retry, with its
``countdown``, autoretries included; ``taskhost.Reject`` for a rejection).
"""

import json as _json
from types import SimpleNamespace

from . import _call, _double

__all__ = ["FakeHost"]


class FakeHost:
    """The host, for one test: starts afresh (nothing recorded) each time one is made."""

    def __init__(self, config=None, *, retries=0, task_id="test-task",
                 hostname="test@localhost", root_id=None, parent_id=None):
        _double.recorded.__init__()
        _double.recorded.config.update(config or {})
        self.retries = retries
        self.task_id = task_id
        self.hostname = hostname
        self.root_id = root_id
        self.parent_id = parent_id

    @property
    def config(self):
        """The config values the plugin reads (``taskhost.config``)."""
        return _double.recorded.config

    @property
    def progress(self):
        """Each ``update_state`` so far: ``(state, meta)``."""
        return list(_double.recorded.progress)

    @property
    def logs(self):
        """Each log line so far: ``(level, message)``, levels ``debug`` to ``error``."""
        return list(_double.recorded.logs)

    @property
    def sent(self):
        """Each signature sent so far, as Celery's ``dict``."""
        return list(_double.recorded.sent)

    @property
    def requests(self):
        """Each HTTP request so far: ``(METHOD, url, headers, body)``."""
        return list(_double.recorded.requests)

    def respond(self, method, url, *, status=200, json=None, body=b"", headers=None):
        """The answer to ``method url``: ``json`` (as JSON) or ``body``."""
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        if json is not None:
            body = _json.dumps(json).encode()
            headers.setdefault("content-type", "application/json")
        elif isinstance(body, str):
            body = body.encode()
        _double.recorded.responses[(method.upper(), url)] = (status, headers, body)

    def deny(self, origin):
        """Refuses every request to ``origin`` (``scheme://host:port``), as the worker refuses
        an origin the operator did not grant."""
        _double.recorded.denied.add(origin.rstrip("/"))

    def run(self, task, *args, **kwargs):
        """Runs ``task`` (what ``@task`` returned) with ``args`` and ``kwargs``; returns its
        result as the producer would read it."""
        record = SimpleNamespace(
            id=self.task_id, name=task.name, args=_json.dumps(list(args)),
            kwargs=_json.dumps(kwargs), retries=self.retries, root_id=self.root_id,
            parent_id=self.parent_id, hostname=self.hostname, soft_deadline_ms=None,
        )
        return _json.loads(_call(task, record))
