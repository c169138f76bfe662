"""The app of a `taskhost dev --watch` build: the author's ``app`` read from the project's
sources at each instance's first call, so an edit is served without building again.

The build imports ``app`` once, as an ordinary build does: the snapshot then holds the
interpreter with every module the app imports (the standard library is only available to a
plugin as far as its build imported it). At run time, where the worker grants the project's
directory read-only at ``SOURCES``, the project's own modules are forgotten and imported again
from there; the SDK and the standard library stay as the snapshot holds them. Where nothing is
granted (any worker but ``taskhost dev``), the build's version of the app serves.
"""

import importlib
import os
import sys

import app  # noqa: F401 - the build's version, and every module it imports, in the snapshot
import taskhost

# taskhost's `DEV_SOURCES` (host/src/config/grants.rs).
SOURCES = "/taskhost-dev/sources"

_project = os.path.dirname(os.path.abspath(app.__file__))
_read = False


def _read_sources():
    """Imports the project's modules again from ``SOURCES``, once per instance."""
    global _read
    if _read:
        return
    _read = True
    if not os.path.isdir(SOURCES):
        return
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and _inside(os.path.abspath(path)):
            del sys.modules[name]
    taskhost._registry.clear()
    sys.path[:] = [SOURCES] + [p for p in sys.path if not _inside(p)]
    # (No importlib.invalidate_caches(): it imports importlib.metadata, which the snapshot
    # lacks; the new path entry has no cached finder anyway.)
    sys.dont_write_bytecode = True
    importlib.import_module("app")


def _inside(path):
    return path == _project or path.startswith(_project.rstrip(os.sep) + os.sep)


class Handler(taskhost.Handler):
    """The SDK's export, after the sources are read."""

    def tasks(self):
        _read_sources()
        return super().tasks()

    def run(self, task):
        _read_sources()
        return super().run(task)
