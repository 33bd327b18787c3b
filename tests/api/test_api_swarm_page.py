"""The swarm page in a real browser (headless Chromium) against a real two-node swarm,
and the JSON it polls: bounded, behind the API key, escaped where a peer wrote it."""

from __future__ import annotations

import html
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from api_helpers import MODEL, Gated, Serve

from p2pedge.api import ApiApp, serve_api
from p2pedge.node import node as node_module
from p2pedge.node.api import api_for
from p2pedge.node.config import NodeConfig, ServeSpec
from p2pedge.node.hardware import probe_hardware
from p2pedge.node.node import Node

# what a hostile peer signs into its card: markup that would run if the page used it as HTML
HOSTILE_OS = "<img src=x onerror=\"document.title='pwned'\">"
HOSTILE_ARCH = "<script>document.title='pwned'</script>"
CHROMIUM_FLAGS = ("--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed: `make chromium` (Debian, as root) installs it")
    return found


async def browse(url: str, *extra: str) -> bytes:
    """Chromium's stdout once the page's script ran (virtual time lets its fetch finish)."""
    argv = [chromium(), *CHROMIUM_FLAGS, "--virtual-time-budget=5000", *extra, url]
    with trio.fail_after(60):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
    return done.stdout


async def test_the_page_shows_both_peers_and_the_coverage_and_escapes_a_hostile_card(
    tiny: Path, config: Callable[..., NodeConfig], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hostile = replace(probe_hardware(), os=HOSTILE_OS, arch=HOSTILE_ARCH)
    dirs = ((MODEL, tiny),)
    # both cards say HOSTILE_*: the page shows a peer's card and this node's own differently
    monkeypatch.setattr(node_module, "probe_hardware", lambda data_dir=None: hostile)
    worker_config = config("worker", model_dirs=dirs, serve=(ServeSpec.parse(f"{MODEL}:0-2"),))
    async with Node(worker_config) as worker:
        front_config = config(
            "front", model_dirs=dirs, serve=(ServeSpec.parse(f"{MODEL}:2-4"),),
            bootstrap=(worker.addrs[0],),
        )  # fmt: skip
        async with Node(front_config) as front, trio.open_nursery() as nursery:
            await worker.announce()
            await front.complete(MODEL, prompt="hi", max_tokens=2, route="local")  # warm it
            port = await nursery.start(serve_api, ApiApp(api_for(front)))
            dom = (await browse(f"http://127.0.0.1:{port}/", "--dump-dom")).decode()
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            shot = tmp_path / "swarm.png"
            await browse(
                f"http://127.0.0.1:{port}/", f"--screenshot={shot}", "--window-size=1200,1000"
            )
            nursery.cancel_scope.cancel()
    assert "updated" in dom, dom  # the script ran and fetched /v1/swarm
    assert f"{front.peer_id} (this node)" in dom and worker.peer_id in dom
    assert f"{MODEL}: 4 blocks, fully covered" in dom
    assert f"{MODEL} 0-2" in dom  # the worker's card: blocks it serves
    cache = dom.split("Model cache")[1].split("Pulls in progress")[0]
    assert "1 model(s)" in cache and MODEL in cache  # the model complete() warmed
    # the hostile card is there, as text: escaped in the DOM, never an element or script
    assert html.escape(HOSTILE_OS, quote=False) in dom and HOSTILE_OS not in dom
    assert html.escape(HOSTILE_ARCH, quote=False) in dom and "<img" not in dom
    assert "<title>p2pedge swarm</title>" in dom and "pwned</title>" not in dom
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "\np2pedge_peers 1.0\n" in metrics


async def test_the_json_is_behind_the_key_and_lists_live_sessions_and_pulls(serve: Serve) -> None:
    key = "k3y"
    async with serve(wrap=Gated, key=key) as api, httpx.AsyncClient(base_url=api.root) as http:
        gated: Gated = api.app.backend
        resumable = api.node.store.partial / f"{'ab' * 32}-1024"  # a pull cut after 1 chunk
        resumable.mkdir(parents=True)
        (resumable / "0").write_bytes(b"x" * 1024)
        page = await http.get("/")
        assert page.status_code == 200 and "/swarm.js" in page.text
        assert "script-src 'self';" in page.headers["content-security-policy"]
        assert (await http.get("/swarm.js")).headers["content-type"].startswith("text/javascript")
        assert (await http.get("/v1/swarm")).status_code == 401
        auth = {"authorization": f"Bearer {key}"}
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 8, "stream": True}
        async with trio.open_nursery() as nursery:

            async def stream() -> None:
                async with http.stream("POST", "/v1/completions", json=body, headers=auth) as r:
                    async for _ in r.aiter_bytes():
                        pass

            nursery.start_soon(stream)
            gated.release(3)
            await gated.wait_released(3)
            view = (await http.get("/v1/swarm", headers=auth)).json()
            gated.release(100)
        assert [(s["model"], s["where"]) for s in view["sessions"]] == [(MODEL, "local")]
        assert view["sessions"][0]["tokens"] >= 2
        assert view["node"]["local_only"] and view["peers"] == [] and view["peers_total"] == 0
        assert {"id": MODEL, "where": "local"} in view["models"]
        assert view["pulls"] == [{"blob": "ab" * 8, "chunks": 1, "chunk_size": 1024, "bytes": 1024}]
        after = (await http.get("/v1/swarm", headers=auth)).json()
        assert after["sessions"] == []
