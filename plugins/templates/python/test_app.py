"""The tasks of {{name}}, run natively with a test double for the host: in a virtualenv with
the SDK and pytest (`pip install <taskhost>/plugins/sdk-python pytest`), run `pytest`."""

import pytest

from taskhost import CapabilityDenied, Retry
from taskhost.testing import FakeHost

import app


def test_add_returns_the_sum():
    assert FakeHost().run(app.add, 2, 3) == 5


def test_fail_raises_value_error():
    with pytest.raises(ValueError, match="boom"):
        FakeHost().run(app.fail, "boom")


def test_progress_reports_each_step_and_logs():
    host = FakeHost()
    assert host.run(app.progress, 2) == 2
    assert host.progress == [
        ("PROGRESS", {"current": 1, "total": 2}),
        ("PROGRESS", {"current": 2, "total": 2}),
    ]
    assert host.logs == [("info", "counted to 2")]


def test_flaky_asks_for_a_retry_until_its_last_try():
    with pytest.raises(Retry) as retry:
        FakeHost(retries=0).run(app.flaky, 3)
    assert retry.value.countdown == 0.1
    assert FakeHost(retries=2).run(app.flaky, 3) == 2


def test_fetch_returns_the_answers_json():
    host = FakeHost()
    host.respond("GET", "http://api.example/items", json={"items": [1, 2]})
    assert host.run(app.fetch, "http://api.example/items") == {"items": [1, 2]}


def test_fetch_to_an_origin_not_granted_is_denied():
    host = FakeHost()
    host.deny("http://api.example")
    with pytest.raises(CapabilityDenied):
        host.run(app.fetch, "http://api.example/items")
