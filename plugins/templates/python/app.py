"""{{name}}: a taskhost plugin in Python.

Build it with `taskhost build` (in this directory), try a task with
`taskhost exec {{name}}.wasm {{name}}.add --args '[2, 3]'`, and drop {{name}}.wasm into a
worker's plugin directory. Each function below is a Celery task: producers call it with
`app.send_task("{{name}}.add", (2, 3))`.
"""

from taskhost import Handler, get_logger, http, set_version, task  # noqa: F401 (Handler: the export)

set_version("0.1.0")
log = get_logger("{{name}}")


@task(name="{{name}}.add")
def add(x, y):
    """x + y."""
    return x + y


@task(name="{{name}}.fail")
def fail(message):
    """Fails: `.get()` raises ValueError(message), with this traceback."""
    raise ValueError(message)


@task(name="{{name}}.progress", bind=True)
def progress(self, steps):
    """Reports its progress (state PROGRESS, as Celery's update_state), then returns `steps`."""
    for n in range(steps):
        self.update_state(state="PROGRESS", meta={"current": n + 1, "total": steps})
    log.info("counted to %d", steps)
    return steps


@task(name="{{name}}.flaky", bind=True, max_retries=5)
def flaky(self, tries):
    """Asks to be retried until its `tries`-th try, then returns how many retries it took."""
    if self.request.retries + 1 < tries:
        raise self.retry(exc=ConnectionError("not yet"), countdown=0.1)
    return self.request.retries


@task(name="{{name}}.fetch")
def fetch(url):
    """GETs `url` (an origin the operator granted with `allow_http`) and returns its JSON."""
    answer = http.get(url, timeout=10)
    answer.raise_for_status()
    return answer.json()
