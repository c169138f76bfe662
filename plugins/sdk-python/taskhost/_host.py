"""Where the SDK meets the host: the component's imports inside a plugin, and the test double
(:mod:`taskhost.testing`) when the SDK is imported natively, as under pytest."""

try:
    from componentize_py_types import Err
    from wit_world import exports
    from wit_world.imports import host
    from wit_world.imports import taskhost_plugin_types as types

    from ._wasi_http import exchange

    NATIVE = False
except ImportError:  # not inside a component: the test double stands in for the host
    from ._double import Err, exchange, exports, host, types

    NATIVE = True

# wasi:otel's tracing, for the SDK's spans; none natively (a span records nothing there).
try:
    from wit_world.imports import tracing, wall_clock
    from wit_world.imports import wasi_otel_types as otel_types
except ImportError:
    tracing = wall_clock = otel_types = None

__all__ = ["NATIVE", "Err", "exchange", "exports", "host", "types", "tracing", "wall_clock", "otel_types"]
