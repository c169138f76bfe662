"""Write Celery tasks in Python and run them as a taskhost plugin.

A plugin is a module (``app.py``) of decorated functions, built into a WebAssembly component
with componentize-py (``taskhost build``)::

    from taskhost import Handler, task   # Handler is the component's export: keep the import

    @task(name="tasks.add")
    def add(x, y):
        return x + y

    @task(name="tasks.fetch", bind=True, max_retries=5, autoretry_for=(ConnectionError,))
    def fetch(self, url):
        self.update_state(state="PROGRESS", meta={"url": url})
        return taskhost.http.get(url).json()

As in Celery, a task is called with the producer's ``args`` and ``kwargs`` (a mismatch raises
Python's own ``TypeError``), what it returns is its result (it must be JSON-serialisable), and
what it raises is its failure: ``AsyncResult.get()`` raises the same exception type with its
message, and the traceback is the Python one. ``self.retry(...)`` asks for another try,
``Reject(...)`` refuses the message (dead-lettered).

Layout: this file is the author-facing API and the ``Handler`` the host calls;
``taskhost.http`` is the HTTP client (through the origins the operator granted).
"""

import json
import logging
import sys
import time
import traceback as _traceback

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports import taskhost_plugin_types as types

from . import http  # noqa: F401  (taskhost.http)

__all__ = [
    "CapabilityDenied",
    "Handler",
    "Reject",
    "Retry",
    "Task",
    "config",
    "current_task",
    "get_logger",
    "send_task",
    "set_version",
    "task",
]

_version = "0.0.0"
_registry = {}
_current = None


class Retry(Exception):
    """Raised by ``Task.retry``: the task runs again after ``countdown`` seconds (none: its
    exponential backoff), until its ``max_retries``; then it fails with ``exc``."""

    def __init__(self, exc=None, countdown=None):
        self.exc = exc
        self.countdown = countdown
        super().__init__(f"Retry in {countdown}s" if countdown is not None else "Retry")


class Reject(Exception):
    """Raise to refuse the message: it goes to the dead-letter list with ``reason``, and the task
    fails without a retry."""

    def __init__(self, reason="rejected", requeue=False):
        self.reason = str(reason)
        super().__init__(self.reason)


class CapabilityDenied(Exception):
    """Something the operator did not grant: an HTTP origin, a file, a socket."""


class Request:
    """The running task, as Celery's ``self.request``."""

    def __init__(self, record, args, kwargs):
        self.id = record.id
        self.task = record.name
        self.args = args
        self.kwargs = kwargs
        self.retries = record.retries
        self.root_id = record.root_id
        self.parent_id = record.parent_id
        self.hostname = record.hostname
        # Seconds since the epoch; none without a soft time limit.
        self.soft_deadline = (
            record.soft_deadline_ms / 1000 if record.soft_deadline_ms is not None else None
        )


class Task:
    """A registered task; ``bind=True`` passes it as ``self``."""

    def __init__(self, fun, name, bind, options):
        self.run = fun
        self.name = name
        self.bind = bind
        self.options = options
        self.__doc__ = fun.__doc__

    @property
    def request(self):
        """The running task (``self.request.id``, ``.retries``, ``.hostname``, ...)."""
        if _current is None:
            raise RuntimeError("no task is running")
        return _current

    def __call__(self, *args, **kwargs):
        """Runs the function here, as calling a Celery task does."""
        if self.bind:
            return self.run(self, *args, **kwargs)
        return self.run(*args, **kwargs)

    def retry(self, exc=None, countdown=None, max_retries=None, **_options):
        """Asks for another try and raises, as Celery's ``self.retry``: ``raise self.retry(...)``
        reads as Celery code does. ``max_retries`` here is not supported: declare it on the
        task."""
        if max_retries is not None:
            raise TypeError("taskhost: declare max_retries on @task, not in retry()")
        if countdown is not None and not (countdown >= 0):
            raise ValueError(f"countdown must be a number of seconds >= 0, got {countdown!r}")
        raise Retry(exc=exc, countdown=countdown)

    def update_state(self, task_id=None, state="PROGRESS", meta=None):
        """Publishes progress, as Celery's ``update_state``; ready states are the host's."""
        try:
            host.update_state(state, json.dumps(meta))
        except Err as e:
            raise RuntimeError(f"update_state refused: {e.value}") from None

    def soft_time_left(self):
        """Seconds until the soft time limit (never below 0); none without one."""
        deadline = self.request.soft_deadline
        return None if deadline is None else max(0.0, deadline - time.time())

    def __repr__(self):
        return f"<@task: {self.name}>"


def task(name=None, *, bind=False, max_retries=None, retry_backoff=None,
         retry_backoff_max=None, retry_jitter=None, autoretry_for=(), soft_time_limit=None,
         time_limit=None, rate_limit=None, queue=None):
    """Registers a function as a task, with Celery's options (the host enforces them)."""
    for cls in autoretry_for:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"autoretry_for takes exception classes, got {cls!r}")
    if retry_backoff is True:
        retry_backoff = 1.0
    defaults = types.TaskDefaults(
        queue=queue,
        max_retries=max_retries,
        retry_backoff=float(retry_backoff) if retry_backoff else None,
        retry_backoff_max=float(retry_backoff_max) if retry_backoff_max is not None else None,
        retry_jitter=retry_jitter,
        soft_time_limit=float(soft_time_limit) if soft_time_limit is not None else None,
        time_limit=float(time_limit) if time_limit is not None else None,
        rate_limit=rate_limit,
        autoretry_for=[cls.__name__ for cls in autoretry_for] or None,
    )

    def register(fun):
        full = name or f"{fun.__module__}.{fun.__name__}"
        if full in _registry:
            raise ValueError(f"task {full!r} is registered twice")
        registered = Task(fun, full, bind, defaults)
        _registry[full] = registered
        return registered

    if callable(name):  # @task without parentheses
        fun, name = name, None
        return register(fun)
    return register


def current_task():
    """The running task's request, or none between tasks."""
    return _current


def config(key, default=None):
    """One of this plugin's config values, as the operator set them in ``taskhost.toml``."""
    value = host.config(key)
    return default if value is None else value


def send_task(name, args=(), kwargs=None, **options):
    """Sends a task, as Celery's ``app.send_task``; it goes out when this task settles. Returns
    its id. Options: ``queue``, ``countdown``, ``priority``, ``task_id``, ``link``, ... ."""
    signature = {"task": name, "args": list(args), "kwargs": kwargs or {}, "options": options}
    try:
        return host.send(json.dumps(signature))
    except Err as e:
        raise RuntimeError(f"cannot send {name}: {e.value}") from None


def set_version(version):
    """The plugin's own version, shown beside the content hash the host computes."""
    global _version
    _version = str(version)


class _HostLog(logging.Handler):
    """Sends records to the host's log, tagged there with the plugin, task and task id."""

    def emit(self, record):
        if record.levelno >= logging.ERROR:
            level = host.Level.ERROR
        elif record.levelno >= logging.WARNING:
            level = host.Level.WARN
        elif record.levelno >= logging.INFO:
            level = host.Level.INFO
        else:
            level = host.Level.DEBUG
        try:
            host.log(level, self.format(record), [("logger", record.name)])
        except Exception:  # noqa: BLE001 - a log line must never fail a task
            pass


_root = logging.getLogger("taskhost")
_root.addHandler(_HostLog())
_root.setLevel(logging.DEBUG)
_root.propagate = False


def get_logger(name):
    """A logger whose lines go to the worker's log (as Celery's ``get_task_logger``)."""
    return _root.getChild(name)


def _error(exc):
    # The traceback starts at the author's code: the SDK's own frames that called it are left
    # out. (A plugin carries bytecode, not source: frames show file, line and function.)
    frames = exc.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename == __file__:
        frames = frames.tb_next
    tb = "".join(_traceback.format_exception(type(exc), exc, frames))
    return types.TaskError(kind=type(exc).__name__, message=str(exc), traceback=tb)


def _renew_random():
    # A fresh instance starts from the snapshot taken when the plugin was built, and with it
    # the state `random` was seeded with then: every task would draw the same numbers. Seeded
    # again from the host's entropy, as a Celery worker's forked child is.
    module = sys.modules.get("random")
    if module is not None:
        module.seed()


def _run(registered, record):
    global _current
    _renew_random()
    args = json.loads(record.args)
    kwargs = json.loads(record.kwargs)
    _current = Request(record, args, kwargs)
    try:
        return json.dumps(registered(*args, **kwargs))
    except Retry as retry:
        reason = _error(retry.exc) if retry.exc is not None else _error(retry)
        request = types.RetryRequest(countdown=retry.countdown, reason=reason)
        raise Err(types.Failure_Retry(request)) from None
    except Reject as reject:
        raise Err(types.Failure_Reject(reject.reason)) from None
    except Exception as exc:  # noqa: BLE001 - every failure is the task's outcome
        raise Err(types.Failure_Error(_error(exc))) from None
    finally:
        _current = None


class Handler(exports.Handler):
    """The component's export: the host asks it for the tasks, then runs them."""

    def version(self):
        return _version

    def tasks(self):
        return [types.TaskInfo(name=t.name, defaults=t.options) for t in _registry.values()]

    def run(self, task):
        registered = _registry.get(task.name)
        if registered is None:
            error = types.TaskError("NotRegistered", repr(task.name), None)
            raise Err(types.Failure_Error(error))
        return _run(registered, task)
