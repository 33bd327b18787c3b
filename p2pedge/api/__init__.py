"""An OpenAI-compatible HTTP API and Prometheus metrics in front of a node.

``app = ApiApp(backend)`` then ``port = await nursery.start(serve_api, app)``; a node's
backend is :func:`p2pedge.node.api.api_for` (the node builds the API, the API never
imports the node).
"""

from p2pedge.api.app import ApiApp
from p2pedge.api.schema import ApiLimits
from p2pedge.api.server import load_key, parse_api_listen, serve_api

__all__ = [
    "ApiApp",
    "ApiLimits",
    "load_key",
    "parse_api_listen",
    "serve_api",
]
