"""The crucible plugin in Python: the code-evaluation service's Celery tasks, as the Rust
crucible (plugins/crucible) serves them, passing the same tests.

- ``tasks.evaluate_code(eval_id, code, language)``: POST the code to the executor service, PUT
  the executor's answer to the storage service, return ``{"eval_id", "status", ...answer}``. An
  unreachable service or a 5xx is retried with exponential backoff (Celery's ``autoretry_for``
  with ``retry_backoff``); a 4xx fails with the service's message.
- ``tasks.cleanup_old_evaluations(max_age_hours=24)``: ask storage to delete old evaluations,
  return how many it deleted.
- ``tasks.health_check()``: ``{"status": "healthy", "hostname", "timestamp"}``.

The service URLs are the plugin's config values ``executor_service_url`` and
``storage_service_url``; the host lets HTTP through only to the origins it granted.
"""

from datetime import datetime, timezone
from urllib.parse import quote

from taskhost import Handler, http, task, config, set_version  # noqa: F401 (Handler: the export)

set_version("0.1.0")


class ConfigurationError(Exception):
    pass


class HTTPError(Exception):
    pass


class ServiceUnavailable(Exception):
    pass


# What is worth another try: the service could not be reached, or answered 5xx.
TRANSIENT = (ConnectionError, TimeoutError, ServiceUnavailable)


@task(name="tasks.evaluate_code", queue="evaluations", max_retries=3, retry_backoff=1.0,
      retry_backoff_max=60.0, retry_jitter=True, autoretry_for=TRANSIENT)
def evaluate_code(eval_id, code, language):
    """Runs ``code`` in the executor service and stores the outcome."""
    eval_id = _id_text(eval_id)
    executor = _service_url("executor_service_url")
    storage = _service_url("storage_service_url")
    answer = _call("POST", f"{executor}/execute",
                   {"eval_id": eval_id, "code": code, "language": language}, "executor")
    _call("PUT", f"{storage}/evaluations/{quote(eval_id, safe='')}", answer, "storage")
    out = {"eval_id": eval_id, "status": "completed"}
    if isinstance(answer, dict):
        out.update(answer)
    else:
        out["output"] = answer
    return out


@task(name="tasks.cleanup_old_evaluations", queue="maintenance", max_retries=3,
      retry_backoff=1.0, autoretry_for=TRANSIENT)
def cleanup_old_evaluations(max_age_hours=24):
    """Deletes evaluations older than ``max_age_hours``; returns how many."""
    storage = _service_url("storage_service_url")
    url = f"{storage}/evaluations?older_than_hours={int(max_age_hours)}"
    answer = _call("DELETE", url, None, "storage")
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    if isinstance(answer, dict):
        for key in ("deleted", "deleted_count", "count"):
            if isinstance(answer.get(key), int):
                return answer[key]
    raise ValueError(f"storage answered without a deleted count: {answer}")


@task(name="tasks.health_check", bind=True)
def health_check(self):
    """Reports this worker as healthy."""
    return {
        "status": "healthy",
        "hostname": self.request.hostname,
        "timestamp": datetime.now(timezone.utc).isoformat(),
    }


def _service_url(key):
    url = config(key)
    if not url:
        raise ConfigurationError(
            f"config value {key!r} is not set for this plugin (see taskhost.toml)")
    return url.rstrip("/")


def _id_text(eval_id):
    if isinstance(eval_id, str) and eval_id:
        return eval_id
    if isinstance(eval_id, (int, float)) and not isinstance(eval_id, bool):
        return str(eval_id)
    raise TypeError(f"eval_id must be a non-empty string or a number, got {eval_id!r}")


def _call(method, url, body, service):
    """One HTTP call; the answer's JSON (None for an empty body). Transport errors and 5xx are
    TRANSIENT (retried), 4xx fail with the service's message; a denied origin fails as
    CapabilityDenied (raised by the client)."""
    try:
        answer = http.request(method, url, json=body, timeout=30)
    except (ConnectionError, TimeoutError) as e:
        raise ConnectionError(f"{service}: {e}") from None
    status = answer.status_code
    if status >= 500:
        raise ServiceUnavailable(
            f"{service} {method} {url} answered {status}: {_service_message(answer.text)}")
    if status >= 300:
        raise HTTPError(
            f"{service} {method} {url} answered {status}: {_service_message(answer.text)}")
    try:
        return answer.json()
    except ValueError as e:
        raise ValueError(f"{service} answered with invalid JSON: {e}") from None


def _service_message(text):
    """The message in a service's error answer: FastAPI's ``detail``, or ``error``/``message``,
    or the text."""
    import json

    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        for key in ("detail", "error", "message"):
            if key in doc:
                value = doc[key]
                return value if isinstance(value, str) else json.dumps(value)
    return text.strip() or "(empty answer)"
