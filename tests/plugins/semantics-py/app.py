"""Test plugin: the Python SDK's Celery semantics, one task per behaviour
(tests/sdk_semantics.rs sends them from Python Celery). Served as `sem`."""

from datetime import datetime, timedelta, timezone

from taskhost import (  # noqa: F401 (Handler: the export)
    Handler, Reject, chain, chord, current_task, group, signature, span, task,
)


@task(name="sem.add")
def add(x, y):
    return x + y


@task(name="sem.tsum")
def tsum(numbers):
    return sum(numbers)


@task(name="sem.autoretry_subclass", bind=True, autoretry_for=(OSError,), max_retries=1,
      default_retry_delay=0.1)
def autoretry_subclass(self):
    """ConnectionRefusedError is an OSError: retried, as Celery retries subclasses."""
    raise ConnectionRefusedError(f"try {self.request.retries}")


@task(name="sem.autoretry_not_excluded", bind=True, autoretry_for=(OSError,),
      dont_autoretry_for=(FileNotFoundError,), max_retries=3, default_retry_delay=0.1)
def autoretry_not_excluded(self):
    """FileNotFoundError is excluded: it fails at once."""
    raise FileNotFoundError("not retried")


@task(name="sem.retry_default_delay", bind=True)
def retry_default_delay(self):
    """No countdown: Celery's default_retry_delay, 180 s."""
    raise self.retry(exc=RuntimeError("later"))


@task(name="sem.retry_eta", bind=True, max_retries=2)
def retry_eta(self):
    if self.request.retries == 0:
        raise self.retry(eta=datetime.now(timezone.utc) + timedelta(milliseconds=200))
    return self.request.retries


@task(name="sem.retry_with_args", bind=True)
def retry_with_args(self):
    raise self.retry(args=(1,))


@task(name="sem.reject_requeue")
def reject_requeue():
    raise Reject("again", requeue=True)


@task(name="sem.update_other", bind=True)
def update_other(self, other):
    self.update_state(task_id=other, state="PROGRESS", meta={"forged": True})


@task(name="sem.update_own", bind=True)
def update_own(self):
    self.update_state(task_id=self.request.id, state="PROGRESS", meta={"step": 1})
    return "done"


@task(name="sem.current", bind=True)
def current(self):
    return {"name": current_task.name, "same_id": current_task.request.id == self.request.id}


@task(name="sem.send_signature")
def send_signature():
    return signature("sem.add", (1, 2)).delay().id


@task(name="sem.send_as")
def send_as(task_id):
    """Sends sem.add(40, 2) naming `task_id` as its id: the host makes its own."""
    return signature("sem.add", (40, 2)).apply_async(task_id=task_id).id


@task(name="sem.send_chain")
def send_chain():
    return (add.s(1, 2) | add.s(10)).delay().id


@task(name="sem.send_chord")
def send_chord():
    return chord([add.s(i, i) for i in range(3)], tsum.s()).delay().id


@task(name="sem.send_group")
def send_group():
    return group(add.s(i, 1) for i in range(3)).delay().id


@task(name="sem.get_inside")
def get_inside():
    add.delay(1, 1).get()


@task(name="sem.traced")
def traced(words):
    """Spans of its own: one around the count, one per word nested in it."""
    with span("count letters") as s:
        s.set_attribute("words", len(words))
        letters = 0
        for word in words:
            with span("measure") as m:
                m.set_attribute("word", word)
                letters += len(word)
        s.set_attribute("letters", letters)
    return letters


@task(name="sem.traced_failure")
def traced_failure():
    """An exception leaving a span is recorded on it, which is marked an error."""
    with span("doomed"):
        raise ValueError("inside a span")
