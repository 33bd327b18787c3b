"""An OpenAI-compatible HTTP API and Prometheus metrics in front of a node.

``app = ApiApp(api_for(node))`` then ``port = await nursery.start(serve_api, app)``.
"""

from p2pedge.api.app import ApiApp
from p2pedge.api.bind import api_for
from p2pedge.api.schema import ApiLimits
from p2pedge.api.server import load_key, parse_api_listen, serve_api, serve_node_api

__all__ = [
    "ApiApp",
    "ApiLimits",
    "api_for",
    "load_key",
    "parse_api_listen",
    "serve_api",
    "serve_node_api",
]
