"""Sending tasks from inside a task, as Celery's canvas does: a signature, or a chain, group or
chord of them, handed to the host, which sends it when the running task settles (with the
running task as its parent)::

    from taskhost import chain, chord, group, signature, task

    @task(name="demo.fan_out", bind=True)
    def fan_out(self, n):
        chord([signature("demo.add", (i, i)) for i in range(n)], signature("demo.tsum")).delay()
        (signature("demo.add", (1, 2)) | signature("demo.mul", (10,))).delay()
        return group(signature("demo.add", (i, 1)) for i in range(n)).delay().id

A signature is a ``dict`` in Celery's own shape (``task``, ``args``, ``kwargs``, ``options``,
``subtask_type``, ``immutable``), so one a producer sent as an argument can be sent on:
``signature(payload).delay()``. ``apply_async`` and ``delay`` return the id of what was sent
(the group's id for a group, the body's for a chord) as ``.id``; ``.get()`` on it raises, as
in Celery: a task must not wait for another.
"""

import json

from ._host import Err, host

__all__ = ["SentResult", "Signature", "chain", "chord", "group", "signature"]


class SentResult:
    """What was sent: its id (``.id``). Waiting for it inside a task is refused, as Celery
    refuses it."""

    def __init__(self, task_id):
        self.id = task_id

    def get(self, *args, **kwargs):
        raise RuntimeError(
            "Never call result.get() within a task! (a task that waits for another holds its "
            "slot while it waits; link a callback or use a chord instead)"
        )

    def __str__(self):
        return self.id

    def __repr__(self):
        return f"<SentResult: {self.id}>"


class Signature(dict):
    """A task with its arguments and options (Celery's ``Signature``)."""

    def __init__(self, task=None, args=(), kwargs=None, options=None, subtask_type=None,
                 immutable=False, **ex):
        if isinstance(task, dict):
            fields = dict(task)
            super().__init__(
                task=fields.get("task"),
                args=list(fields.get("args") or ()),
                kwargs=dict(fields.get("kwargs") or {}),
                options=dict(fields.get("options") or {}),
                subtask_type=fields.get("subtask_type"),
                immutable=bool(fields.get("immutable", False)),
            )
            return
        if not isinstance(task, str) or not task:
            raise TypeError(f"a signature names a task, got {task!r}")
        super().__init__(
            task=task,
            args=list(args or ()),
            kwargs=dict(kwargs or {}),
            options={**(options or {}), **ex},
            subtask_type=subtask_type,
            immutable=bool(immutable),
        )

    task = property(lambda self: self["task"])
    args = property(lambda self: tuple(self["args"]))
    kwargs = property(lambda self: self["kwargs"])
    options = property(lambda self: self["options"])
    immutable = property(lambda self: self["immutable"])
    subtask_type = property(lambda self: self["subtask_type"])

    def clone(self, args=None, kwargs=None, **options):
        """A copy with ``args`` put before its own and ``kwargs``/``options`` merged in (not
        the arguments of an immutable signature)."""
        copy = Signature(json.loads(json.dumps(self)))
        if not copy.immutable:
            copy["args"] = list(args or ()) + copy["args"]
            copy["kwargs"] = {**copy["kwargs"], **(kwargs or {})}
        copy["options"].update(options)
        return copy

    def set(self, immutable=None, **options):
        """Sets options (``queue``, ``countdown``, ``priority``, ...); returns the signature."""
        if immutable is not None:
            self["immutable"] = bool(immutable)
        self["options"].update(options)
        return self

    def set_immutable(self, immutable):
        self["immutable"] = bool(immutable)

    def link(self, callback):
        """Calls ``callback`` with this task's result when it succeeds; returns ``callback``."""
        self["options"].setdefault("link", []).append(dict(callback))
        return callback

    def link_error(self, errback):
        """Calls ``errback`` with this task's id when it fails; returns ``errback``."""
        self["options"].setdefault("link_error", []).append(dict(errback))
        return errback

    def apply_async(self, args=None, kwargs=None, **options):
        """Sends it (with ``args`` first and ``kwargs`` merged in); it goes out when the running
        task settles."""
        sent = self.clone(args, kwargs, **options) if (args or kwargs or options) else self
        try:
            return SentResult(host.send(json.dumps(sent)))
        except Err as e:
            raise RuntimeError(f"cannot send {self.task}: {e.value}") from None

    def delay(self, *args, **kwargs):
        """``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    def __or__(self, other):
        if isinstance(other, Signature):
            return chain(self, other)
        return NotImplemented

    def __repr__(self):
        arguments = [repr(a) for a in self["args"]]
        arguments += [f"{k}={v!r}" for k, v in self["kwargs"].items()]
        return f"{self.task}({', '.join(arguments)})"


def signature(varies, args=(), kwargs=None, options=None, **ex):
    """A signature: of the task named ``varies``, or from a signature ``dict`` (one a producer
    sent as an argument, say)."""
    if isinstance(varies, dict):
        return _from_dict(varies)
    return Signature(varies, args, kwargs, options, **ex)


def _from_dict(fields):
    kind = fields.get("subtask_type")
    sig = Signature(fields)
    if kind in ("chain", "group", "chord"):
        sig.__class__ = {"chain": chain, "group": group, "chord": chord}[kind]
    return sig


def _tasks(tasks):
    """Tasks given as several arguments or as one iterable."""
    if len(tasks) == 1 and not isinstance(tasks[0], dict):
        tasks = tuple(tasks[0])
    for t in tasks:
        if not isinstance(t, dict):
            raise TypeError(f"expected signatures, got {t!r}")
    return [dict(t) for t in tasks]


class chain(Signature):
    """Runs each task after the one before, passing its result on (``a | b | c``)."""

    def __init__(self, *tasks, **options):
        super().__init__("celery.chain", (), {"tasks": _tasks(tasks)}, options, "chain")

    def clone(self, args=None, kwargs=None, **options):
        copy = _from_dict(json.loads(json.dumps(self)))
        steps = copy["kwargs"]["tasks"]
        if steps and (args or kwargs):
            steps[0] = dict(Signature(steps[0]).clone(args, kwargs))
        copy["options"].update(options)
        return copy

    def __or__(self, other):
        if isinstance(other, Signature):
            return chain(*self["kwargs"]["tasks"], other)
        return NotImplemented


class group(Signature):
    """Runs the tasks in parallel; their results are read together in order."""

    def __init__(self, *tasks, **options):
        super().__init__("celery.group", (), {"tasks": _tasks(tasks)}, options, "group")

    def clone(self, args=None, kwargs=None, **options):
        copy = _from_dict(json.loads(json.dumps(self)))
        copy["kwargs"]["tasks"] = [
            dict(Signature(t).clone(args, kwargs)) for t in copy["kwargs"]["tasks"]
        ]
        copy["options"].update(options)
        return copy


class chord(Signature):
    """Runs ``header`` in parallel, then ``body`` once with the list of their results:
    ``chord(header, body).delay()``, or ``chord(header)(body)`` as in Celery."""

    def __init__(self, header, body=None, **options):
        fields = {"header": _tasks((header,)), "body": dict(body) if body else None, "kwargs": {}}
        super().__init__("celery.chord", (), fields, options, "chord")

    def clone(self, args=None, kwargs=None, **options):
        copy = _from_dict(json.loads(json.dumps(self)))
        copy["kwargs"]["header"] = [
            dict(Signature(t).clone(args, kwargs)) for t in copy["kwargs"]["header"]
        ]
        copy["options"].update(options)
        return copy

    def apply_async(self, args=None, kwargs=None, **options):
        if not self["kwargs"].get("body"):
            raise TypeError("a chord needs a body: chord(header, body) or chord(header)(body)")
        return super().apply_async(args, kwargs, **options)

    def __call__(self, body, **options):
        self["kwargs"]["body"] = dict(body)
        return self.apply_async(**options)
