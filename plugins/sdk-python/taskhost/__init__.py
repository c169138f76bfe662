"""Write Celery tasks in Python and run them as a taskhost plugin.

A plugin is a module (``app.py``) of decorated functions, built into a WebAssembly component
with componentize-py (``taskhost build``)::

    from taskhost import Handler, http, task   # Handler is the component's export: keep it

    @task(name="tasks.add")
    def add(x, y):
        return x + y

    @task(name="tasks.fetch", bind=True, max_retries=5, retry_backoff=True,
          autoretry_for=(ConnectionError,))
    def fetch(self, url):
        self.update_state(state="PROGRESS", meta={"url": url})
        return http.get(url).json()

As in Celery, a task is called with the producer's ``args`` and ``kwargs`` (a mismatch raises
Python's own ``TypeError``), what it returns is its result (it must be JSON-serialisable), and
what it raises is its failure: ``AsyncResult.get()`` raises the same exception type with its
message, and the traceback is the Python one. ``raise self.retry(...)`` asks for another try,
``Reject(...)`` refuses the message (dead-lettered). ``signature``, ``chain``, ``group`` and
``chord`` send more tasks, as Celery's canvas does; they go out when the task settles.

What Celery offers that a plugin cannot have is refused with a ``TypeError`` saying so, never
silently ignored.

Layout: this file is the author-facing API and the ``Handler`` the host calls;
``taskhost.canvas`` builds what a task sends; ``taskhost.trace`` makes spans of the plugin's own; ``taskhost.http`` is the HTTP client (through
the origins the operator granted); ``taskhost.testing`` runs tasks natively under pytest, the
host played by a test double (``_host`` chooses between the component's imports and it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback as _traceback
from datetime import datetime, timezone
from typing import Any, Callable

from . import http  # noqa: F401  (taskhost.http)
from ._host import Err, exports, host, types
from .canvas import Signature, chain, chord, group, signature
from .trace import Span, span

__all__ = [
    "CapabilityDenied",
    "Handler",
    "Reject",
    "Retry",
    "Signature",
    "Span",
    "Task",
    "chain",
    "chord",
    "config",
    "current_task",
    "get_logger",
    "group",
    "send_task",
    "set_version",
    "signature",
    "span",
    "task",
]

_version = "0.0.0"
_registry = {}
_warmed = False
# The running task and its request; none between tasks.
_current = None
_current_task = None

# Celery's `Task.default_retry_delay`: how long `self.retry()` waits when given no countdown.
DEFAULT_RETRY_DELAY = 180


class Retry(Exception):
    """Raised by ``Task.retry``: the task runs again after ``countdown`` seconds (none: the
    task's exponential backoff, as for ``autoretry_for`` with ``retry_backoff``), until its
    ``max_retries``; then it fails with ``exc``."""

    def __init__(self, exc=None, countdown=None):
        self.exc = exc
        self.countdown = countdown
        super().__init__(f"Retry in {countdown}s" if countdown is not None else "Retry")


class Reject(Exception):
    """Raise to refuse the message: it goes to the dead-letter list with ``reason``, and the task
    fails without a retry. Celery's ``requeue=True`` (give the message back to the queue) is not
    supported: a requeued message would come straight back; ``raise self.retry(...)`` runs the
    task again instead."""

    def __init__(self, reason="rejected", requeue=False):
        if requeue:
            raise TypeError(
                "taskhost: Reject(requeue=True) is not supported (the message is dead-lettered); "
                "raise self.retry(...) to run the task again"
            )
        self.reason = str(reason)
        self.requeue = False
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

    def __init__(self, fun, name, bind, options, autoretry):
        self.run = fun
        self.name = name
        self.bind = bind
        self.options = options
        # (autoretry_for, dont_autoretry_for, retry_backoff, default_retry_delay)
        self._autoretry = autoretry
        self.default_retry_delay = autoretry[3]
        self.max_retries = options.max_retries
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

    def retry(self, exc: BaseException | None = None, countdown: float | None = None,
              eta: datetime | None = None, max_retries: int | None = None, throw: bool = True,
              args: Any = None, kwargs: Any = None, **options: Any) -> Retry:
        """Asks for another try and raises, as Celery's ``self.retry``: ``raise self.retry(...)``
        reads as Celery code does. With neither ``countdown`` nor ``eta`` it waits the task's
        ``default_retry_delay`` (180 s unless the task sets it), as Celery does; ``eta`` is a
        ``datetime`` (naive: UTC). What a plugin cannot do is refused with a ``TypeError``:
        another ``max_retries`` (declare it on ``@task``), new ``args``/``kwargs``,
        ``throw=False``, other options."""
        if max_retries is not None:
            raise TypeError("taskhost: declare max_retries on @task, not in retry()")
        if args is not None or kwargs is not None:
            raise TypeError("taskhost: retry() runs the task again with its own arguments; "
                            "args and kwargs cannot be changed")
        if not throw:
            raise TypeError("taskhost: retry(throw=False) is not supported: raise self.retry()")
        if options:
            raise TypeError(f"taskhost: retry() does not take {', '.join(sorted(options))}")
        if countdown is not None and eta is not None:
            raise TypeError("taskhost: give retry() a countdown or an eta, not both")
        if eta is not None:
            countdown = _seconds_until(eta)
        elif countdown is None:
            countdown = self.default_retry_delay
        if not (countdown >= 0):
            raise ValueError(f"countdown must be a number of seconds >= 0, got {countdown!r}")
        raise Retry(exc=exc, countdown=countdown)

    def update_state(self, task_id: str | None = None, state: str = "PROGRESS",
                     meta: Any = None) -> None:
        """Publishes progress, as Celery's ``update_state``; ready states are the host's. Only
        the running task's own state: another ``task_id`` is refused."""
        own = self.request.id
        if task_id is not None and task_id != own:
            raise ValueError(
                f"taskhost: update_state() publishes the running task's own state ({own}), "
                f"not another task's ({task_id})"
            )
        try:
            host.update_state(state, json.dumps(meta))
        except Err as e:
            raise RuntimeError(f"update_state refused: {e.value}") from None

    def soft_time_left(self) -> float | None:
        """Seconds until the soft time limit (never below 0); none without one."""
        deadline = self.request.soft_deadline
        return None if deadline is None else max(0.0, deadline - time.time())

    # Sending this task, as Celery's: `add.delay(2, 3)`, `add.s(2)`, `add.si(2, 3)`.

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature of this task (partial: a chain step's result comes first)."""
        return signature(self.name, args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature of this task: it keeps its own arguments in a chain."""
        return signature(self.name, args, kwargs, immutable=True)

    def signature(self, args: tuple | list = (), kwargs: dict | None = None,
                  **options: Any) -> Signature:
        return signature(self.name, args, kwargs, **options)

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """Sends this task; it goes out when the running task settles."""
        return self.s(*args, **kwargs).delay()

    def apply_async(self, args: tuple | list = (), kwargs: dict | None = None,
                    **options: Any) -> Any:
        return signature(self.name, args, kwargs).apply_async(**options)

    def __repr__(self):
        return f"<@task: {self.name}>"


def _seconds_until(eta):
    if not isinstance(eta, datetime):
        raise TypeError(f"eta must be a datetime, got {eta!r}")
    if eta.tzinfo is None:
        eta = eta.replace(tzinfo=timezone.utc)
    return max(0.0, (eta - datetime.now(timezone.utc)).total_seconds())


def _exception_classes(value, option):
    classes = tuple(value)
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"{option} takes exception classes, got {cls!r}")
    return classes


def task(name: str | Callable[..., Any] | None = None, *, bind: bool = False,
         max_retries: int | None = None, retry_backoff: bool | float | None = None,
         retry_backoff_max: float | None = None, retry_jitter: bool | None = None,
         autoretry_for: tuple[type[BaseException], ...] = (),
         dont_autoretry_for: tuple[type[BaseException], ...] = (),
         default_retry_delay: float = DEFAULT_RETRY_DELAY, soft_time_limit: float | None = None,
         time_limit: float | None = None, rate_limit: str | None = None,
         queue: str | None = None) -> Any:
    """Registers a function as a task, with Celery's options (the host enforces them).

    ``autoretry_for`` retries on those exceptions and their subclasses (not on
    ``dont_autoretry_for``): after the task's exponential backoff with ``retry_backoff``, else
    after ``default_retry_delay``, as Celery does."""
    autoretry_for = _exception_classes(autoretry_for, "autoretry_for")
    dont_autoretry_for = _exception_classes(dont_autoretry_for, "dont_autoretry_for")
    if not (isinstance(default_retry_delay, (int, float)) and default_retry_delay >= 0):
        raise TypeError(f"default_retry_delay must be seconds >= 0, got {default_retry_delay!r}")
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
        # Matched here, subclasses included, rather than by the host's exact names.
        autoretry_for=None,
    )
    autoretry = (autoretry_for, dont_autoretry_for, bool(retry_backoff), default_retry_delay)

    def register(fun):
        full = name or f"{fun.__module__}.{fun.__name__}"
        if full in _registry:
            raise ValueError(f"task {full!r} is registered twice")
        registered = Task(fun, full, bind, defaults, autoretry)
        _registry[full] = registered
        return registered

    if callable(name):  # @task without parentheses
        fun, name = name, None
        return register(fun)
    return register


class _CurrentTask:
    """Celery's ``current_task``: the running task (``current_task.request.id``), false between
    tasks."""

    def __getattr__(self, attr):
        if _current_task is None:
            raise RuntimeError("no task is running")
        return getattr(_current_task, attr)

    def __bool__(self):
        return _current_task is not None

    def __repr__(self):
        return repr(_current_task) if _current_task is not None else "<current_task: none>"


current_task = _CurrentTask()


def config(key: str, default: str | None = None) -> str | None:
    """One of this plugin's config values, as the operator set them in ``taskhost.toml``."""
    value = host.config(key)
    return default if value is None else value


def send_task(name: str, args: tuple | list = (), kwargs: dict | None = None,
              **options: Any) -> str:
    """Sends a task, as Celery's ``app.send_task``; it goes out when this task settles. Returns
    its id. Options: ``queue``, ``countdown``, ``priority``, ``link``, ... ."""
    return signature(name, args, kwargs).apply_async(**options).id


def set_version(version: str) -> None:
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


def get_logger(name: str) -> logging.Logger:
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
    # 256 bits from the host's entropy: plenty for a Mersenne Twister that is not for secrets
    # (`secrets` is), and a fifth of the cost of `seed()`, which draws 2,496 bytes to seed it
    # and is paid by every task (the SDK's own imports bring `random` in).
    module = sys.modules.get("random")
    if module is not None:
        module.seed(int.from_bytes(os.urandom(32), "little"))


def _retry(exc, countdown):
    reason = _error(exc) if exc is not None else _error(Retry(countdown=countdown))
    return Err(types.Failure_Retry(types.RetryRequest(countdown=countdown, reason=reason)))


def _call(registered, record):
    """Runs ``registered`` for ``record`` as Celery would: the result as JSON, or what the task
    raised (an exception its ``autoretry_for`` covers becomes a ``Retry``)."""
    global _current, _current_task
    _renew_random()
    args = json.loads(record.args)
    kwargs = json.loads(record.kwargs)
    _current = Request(record, args, kwargs)
    _current_task = registered
    try:
        return json.dumps(registered(*args, **kwargs))
    except (Retry, Reject):
        raise
    except Exception as exc:
        autoretry_for, dont_autoretry_for, backoff, delay = registered._autoretry
        if autoretry_for and isinstance(exc, autoretry_for) \
                and not isinstance(exc, dont_autoretry_for):
            # As Celery's autoretry: the task's backoff with retry_backoff, else its delay.
            raise Retry(exc=exc, countdown=None if backoff else delay) from exc
        raise
    finally:
        _current = None
        _current_task = None


def _run(registered, record):
    """What the host's ``run`` returns: the result, or the failure the task's outcome is."""
    try:
        return _call(registered, record)
    except Retry as retry:
        raise _retry(retry.exc, retry.countdown) from None
    except Reject as reject:
        raise Err(types.Failure_Reject(reject.reason)) from None
    except Exception as exc:  # noqa: BLE001 - every failure is the task's outcome
        raise Err(types.Failure_Error(_error(exc))) from None


class _WarmUpRecord:
    """A task record of the SDK's own, for ``_warm_up``."""

    id = name = "taskhost.warm-up"
    args = '[2, 3, "x", [1.5, null], {"k": true}]'
    kwargs = '{"k": 1}'
    retries = 0
    root_id = parent_id = hostname = soft_deadline_ms = None


def _warm_up():
    # CPython rewrites the bytecode it runs in its first executions (specialising each
    # instruction to the types it meets), writing into the code objects' memory. A fresh
    # instance starts from the snapshot `taskhost build` takes after `tasks()`: whatever the
    # snapshot holds specialised is not specialised again, and its pages not dirtied again, by
    # every task. So the SDK's own path of a task call runs here, before the snapshot, with a
    # task of its own (the author's tasks are not called: they may have effects).
    def warm(*args, **kwargs):
        return [args, kwargs]

    registered = Task(warm, _WarmUpRecord.name, False, types.TaskDefaults(
        queue=None, max_retries=None, retry_backoff=None, retry_backoff_max=None,
        retry_jitter=None, soft_time_limit=None, time_limit=None, rate_limit=None,
        autoretry_for=None), ((), (), False, 180))
    for _ in range(64):
        _run(registered, _WarmUpRecord)


class Handler(exports.Handler):
    """The component's export: the host asks it for the tasks, then runs them."""

    def version(self):
        return _version

    def tasks(self):
        global _warmed
        if not _warmed:
            _warmed = True
            _warm_up()
        return [types.TaskInfo(name=t.name, defaults=t.options) for t in _registry.values()]

    def run(self, task):
        registered = _registry.get(task.name)
        if registered is None:
            error = types.TaskError("NotRegistered", repr(task.name), None)
            raise Err(types.Failure_Error(error))
        return _run(registered, task)
