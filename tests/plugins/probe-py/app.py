"""Test plugin: looks for what an earlier task left behind, then leaves its own.

`probe.find_and_leave(secret)` returns what it found of earlier tasks (a module global, an
attribute set on a standard module, a file, live objects holding an earlier secret) and its
first random draw, then leaves `secret` in each of those places for the next task to find.
"""

import gc
import json
import random

from taskhost import Handler, task  # noqa: F401 (Handler: the export)

LEFT = None
KEPT = []
MARK = "taskhost-probe-secret:"


def _file():
    try:
        with open("/tmp/taskhost-probe", encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _live_secrets(own):
    return sorted(
        o for o in gc.get_objects() + KEPT
        if isinstance(o, str) and o.startswith(MARK) and o != own
    )


@task(name="probe.find_and_leave")
def find_and_leave(secret):
    global LEFT
    own = MARK + secret
    found = {
        "global": LEFT,
        "attribute": getattr(json, "_taskhost_probe", None),
        "file": _file(),
        "heap": _live_secrets(own),
    }
    draw = random.random()
    LEFT = secret
    json._taskhost_probe = secret
    KEPT.append(own)
    try:
        with open("/tmp/taskhost-probe", "w", encoding="utf-8") as f:
            f.write(secret)
    except OSError:
        pass
    return {"found": found, "random": draw}
