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

__all__ = ["NATIVE", "Err", "exchange", "exports", "host", "types"]
