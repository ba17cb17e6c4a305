"""``retrac serve``: an HTTP service and a web page over indexes loaded once.

``AttributionService.load`` loads the ``Attributor`` (model, checkpoints, projectors, indexes), the
training images and, optionally, an audit's pixel index; ``create_app`` wraps it in a FastAPI app
(``POST /attribute``, ``POST /audit``, ``GET /samples/{id}``, ``GET /indexes``, ``GET /health`` and
the page at ``/``); ``run_server`` serves it with uvicorn. The names are imported lazily, so that
``retrac --help`` does not import the web stack.
"""

from __future__ import annotations

__all__ = ["AttributionService", "ServeConfig", "create_app", "run_server"]

_HOMES = {
    "AttributionService": "retrac.serve.service",
    "ServeConfig": "retrac.serve.config",
    "create_app": "retrac.serve.app",
    "run_server": "retrac.serve.app",
}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'retrac.serve' has no attribute {name!r}")
