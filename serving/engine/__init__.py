"""The engine wing: what a step is and what it produces. Requests are admitted (admission), scheduled into
batches (scheduler), run through the layer groups (pipeline) and turned into streams (outputs), one loop
driving them (engine). It imports neither the API edge nor the Ray Serve placement.

`from serving.engine import Engine` is resolved lazily so that the light modules of this package (exceptions,
messages, params, config) import without torch."""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from serving.engine.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
