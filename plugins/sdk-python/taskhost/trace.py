"""Spans of your own inside a task, for the worker's trace: each ``span`` nests under the one
open around it, and the outermost under the task's own span, so a slow task shows where its
time went::

    from taskhost import span

    @task(name="tasks.score")
    def score(rows):
        with span("score rows") as s:
            s.set_attribute("rows", len(rows))
            for row in rows:
                with span("parse row"):
                    ...

As OpenTelemetry's ``start_as_current_span``: an exception leaving the block is recorded on the
span, which is marked an error, and goes on. The spans go through ``wasi:otel/tracing``
(0.2.0-rc.2) to the worker, which exports them with its own when it traces; when it does not
(and under pytest) a span records nothing and costs a check.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from contextlib import contextmanager
from typing import Any, Iterator

from . import _host

__all__ = ["Span", "span"]

# The ids of the spans open now, innermost last: a new span's parent.
_open: list[str] = []


def _now() -> Any:
    ns = time.time_ns()
    return _host.wall_clock.Datetime(seconds=ns // 1_000_000_000, nanoseconds=ns % 1_000_000_000)


def _json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return json.dumps(repr(value))


class Span:
    """A span of your own. Not recording (every method does nothing) when the task is not
    traced."""

    def __init__(self, name: str) -> None:
        self._context = None
        tracing = _host.tracing
        if tracing is None:
            return
        outer = tracing.outer_span_context()
        if tracing.TraceFlags.SAMPLED not in outer.trace_flags or set(outer.trace_id) == {"0"}:
            return
        self._parent = _open[-1] if _open else outer.span_id
        span_id = os.urandom(8).hex()
        self._context = tracing.SpanContext(
            trace_id=outer.trace_id,
            span_id=span_id,
            trace_flags=outer.trace_flags,
            is_remote=False,
            trace_state=outer.trace_state,
        )
        self._name = name
        self._attributes: dict[str, str] = {}
        self._events: list[Any] = []
        self._error: str | None = None
        tracing.on_start(self._context)
        _open.append(span_id)
        self._start = _now()

    @property
    def is_recording(self) -> bool:
        """Whether what is set on this span goes anywhere (the task is traced and sampled)."""
        return self._context is not None

    def set_attribute(self, key: str, value: Any) -> "Span":
        """Sets an attribute: text, a number, a boolean (anything else as its JSON or repr)."""
        if self._context is not None:
            self._attributes[str(key)] = _json(value)
        return self

    def add_event(self, name: str, attributes: dict[str, Any] | None = None) -> "Span":
        """Records that something happened now."""
        if self._context is not None:
            pairs = [_host.otel_types.KeyValue(key=str(k), value=_json(v)) for k, v in (attributes or {}).items()]
            self._events.append(_host.tracing.Event(name=name, time=_now(), attributes=pairs))
        return self

    def record_exception(self, exc: BaseException) -> "Span":
        """Records `exc` as OpenTelemetry's ``exception`` event."""
        return self.add_event(
            "exception",
            {
                "exception.type": type(exc).__name__,
                "exception.message": str(exc),
                "exception.stacktrace": "".join(traceback.format_exception(exc)),
            },
        )

    def set_error(self, description: str) -> "Span":
        """Marks the span failed, saying why."""
        if self._context is not None:
            self._error = description
        return self

    def end(self) -> None:
        """Ends the span (the ``with`` block does)."""
        if self._context is None:
            return
        tracing = _host.tracing
        context, self._context = self._context, None
        if context.span_id in _open:
            _open.remove(context.span_id)
        status = tracing.Status_Error(self._error) if self._error is not None else tracing.Status_Unset()
        tracing.on_end(
            tracing.SpanData(
                span_context=context,
                parent_span_id=self._parent,
                span_kind=tracing.SpanKind.INTERNAL,
                name=self._name,
                start_time=self._start,
                end_time=_now(),
                attributes=[_host.otel_types.KeyValue(key=k, value=v) for k, v in self._attributes.items()],
                events=self._events,
                links=[],
                status=status,
                instrumentation_scope=_host.otel_types.InstrumentationScope(
                    name="taskhost-sdk-python", version=None, schema_url=None, attributes=[]
                ),
                dropped_attributes=0,
                dropped_events=0,
                dropped_links=0,
            )
        )


@contextmanager
def span(name: str) -> Iterator[Span]:
    """A span named `name` for the ``with`` block, nested under the span open around it."""
    s = Span(name)
    try:
        yield s
    except BaseException as exc:
        s.record_exception(exc)
        s.set_error(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        s.end()
