"""Starting the API beside a node: ``--api HOST:PORT``, the key file, and the real port."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from api_helpers import MODEL, Serve

from p2pedge.api import ApiLimits, load_key, parse_api_listen
from p2pedge.errors import ConfigError
from p2pedge.node.api import serve_node_api
from p2pedge.node.config import NodeConfig
from p2pedge.node.node import Node


def test_listen_address_defaults_to_loopback() -> None:
    assert parse_api_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_api_listen(":8080") == ("127.0.0.1", 8080)
    assert parse_api_listen("8080") == ("127.0.0.1", 8080)
    assert parse_api_listen("[::1]:9") == ("::1", 9)
    for bad in ("host:", "host:http", "1:70000", ""):
        with pytest.raises(ConfigError):
            parse_api_listen(bad)


def test_key_file_first_line_and_refusals(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("  s3cret \nignored\n")
    assert load_key(key) == "s3cret"
    key.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_key(key)
    key.write_bytes(b"k" * 5000)
    with pytest.raises(ConfigError, match="larger"):
        load_key(key)
    with pytest.raises(ConfigError, match="cannot read"):
        load_key(tmp_path / "missing")


async def test_serve_node_api_in_the_nodes_nursery(
    tiny: Path, tmp_path: Path, config: Callable[..., NodeConfig]
) -> None:
    key = tmp_path / "api.key"
    key.write_text("k1\n")
    cfg = config("front", local_only=True, model_dirs=((MODEL, tiny),))
    async with Node(cfg) as node:
        start = partial(
            serve_node_api, node, "127.0.0.1:0", key_file=key, cors_origins=["http://ui"]
        )
        port = await node.nursery.start(start)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as h:
            assert (await h.get("/v1/models")).status_code == 401
            r = await h.get(
                "/v1/models", headers={"authorization": "Bearer k1", "origin": "http://ui"}
            )
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui"
            assert MODEL in {m["id"] for m in r.json()["data"]}
    # the node's exit stopped the API with it
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def _post_head(port: int, length: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {length}\r\n\r\n"
    )
    await stream.send_all(head.encode())
    return stream


async def _response(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            piece = await stream.receive_some()
            if not piece:
                break
            data += piece
    return data


async def test_a_stalled_or_trickled_body_is_cut_with_408(serve: Serve) -> None:
    limits = ApiLimits(read_idle_s=0.3, body_s=1.0)
    async with serve(limits=limits) as api:
        stalled = await _post_head(api.port, 100)
        await stalled.send_all(b'{"model"')  # then nothing more
        assert (await _response(stalled)).startswith(b"HTTP/1.1 408")
        trickled = await _post_head(api.port, 10_000)

        async def trickle() -> None:  # a byte every 0.1 s: never idle, always too slow
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for _ in range(100):
                    await trickled.send_all(b" ")
                    await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            assert (await _response(trickled)).startswith(b"HTTP/1.1 408")
            nursery.cancel_scope.cancel()
        refused = api.app.metrics.registry.get_sample_value
        assert refused("p2pedge_refusals_total", {"reason": "timeout"}) == 2
        async with httpx.AsyncClient() as h:  # and a well-behaved client is served
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            }
            r = await h.post(f"{api.base_url}/chat/completions", json=body)
        assert r.status_code == 200


async def test_a_taken_port_is_one_clear_config_error(serve: Serve) -> None:
    async with serve() as api:
        with pytest.raises(ConfigError, match=f"cannot serve the API on 127.0.0.1:{api.port}"):
            await api.node.nursery.start(serve_node_api, api.node, f"127.0.0.1:{api.port}")
        async with httpx.AsyncClient() as h:  # the first server is unharmed
            assert (await h.get(f"{api.base_url}/models")).status_code == 200
