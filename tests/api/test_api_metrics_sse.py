"""``/metrics`` in Prometheus text format, and the SSE framing as ``curl -N`` sees it."""

from __future__ import annotations

import json
import shutil
from typing import Any

import httpx
import openai
import pytest
import trio
from api_helpers import MODEL, Gated, Serve, wait_until
from prometheus_client.parser import text_string_to_metric_families

HI = [{"role": "user", "content": "Hello there"}]


async def scrape(api: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as h:
        r = await h.get(f"{api.root}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


async def test_metrics_count_tokens_timings_cache_and_refusals(serve: Serve) -> None:
    async with serve() as api:
        c = openai.AsyncOpenAI(base_url=api.base_url, api_key="unused", max_retries=0)
        first = await c.chat.completions.create(model=MODEL, messages=HI, max_tokens=7)
        second = await c.chat.completions.create(model=MODEL, messages=HI, max_tokens=5)
        with pytest.raises(openai.NotFoundError):
            await c.chat.completions.create(model="nope", messages=HI)
        async with httpx.AsyncClient() as h:
            big = b"x" * (api.app.limits.max_body_bytes + 1)
            assert (await h.post(f"{api.base_url}/completions", content=big)).status_code == 413
        m = await scrape(api)
        assert first.usage is not None and second.usage is not None
        made = first.usage.completion_tokens + second.usage.completion_tokens
        assert m[("p2pedge_tokens_generated_total", (("route", "local"),))] == made
        assert m[("p2pedge_ttft_seconds_count", (("route", "local"),))] == 2
        assert m[("p2pedge_token_seconds_count", (("route", "local"),))] == made - 2
        assert m[("p2pedge_cache_requests_total", (("result", "miss"),))] == 1
        assert m[("p2pedge_cache_requests_total", (("result", "hit"),))] == 1
        assert m[("p2pedge_cache_loads_total", ())] == 1
        assert m[("p2pedge_cache_models", ())] == 1
        assert m[("p2pedge_refusals_total", (("reason", "request_too_large"),))] == 1
        ok = (("endpoint", "/v1/chat/completions"), ("status", "200"))
        assert m[("p2pedge_api_requests_total", ok)] == 2
        missing = (("endpoint", "/v1/chat/completions"), ("status", "404"))
        assert m[("p2pedge_api_requests_total", missing)] == 1
        assert m[("p2pedge_active_sessions", ())] == 0
        assert m[("p2pedge_queue_depth", ())] == 0


async def test_queue_depth_then_active_sessions_follow_a_request(serve: Serve) -> None:
    gated: list[Gated] = []

    def wrap(inner: Any) -> Gated:
        gated.append(Gated(inner))
        return gated[0]

    async with serve(wrap=wrap) as api, trio.open_nursery() as nursery:
        gate = gated[0]
        c = openai.AsyncOpenAI(base_url=api.base_url, api_key="unused", max_retries=0)
        got: list[Any] = []

        async def ask() -> None:
            stream = await c.chat.completions.create(
                model=MODEL, messages=HI, max_tokens=4, stream=True
            )
            got.extend([chunk async for chunk in stream])

        nursery.start_soon(ask)
        sample = api.app.metrics.registry.get_sample_value
        await wait_until(lambda: sample("p2pedge_queue_depth") == 1)  # no token yet
        assert sample("p2pedge_active_sessions") == 0
        gate.release(1)
        await wait_until(lambda: sample("p2pedge_active_sessions") == 1)
        assert sample("p2pedge_queue_depth") == 0
        gate.release(10)
    assert sample("p2pedge_active_sessions") == 0 and got


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_sees_sse_events_ending_with_done(serve: Serve) -> None:
    async with serve() as api:
        body = {"model": MODEL, "messages": HI, "max_tokens": 6, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        args = ["curl", "-N", "-sS", "--max-time", "30", "-H", "content-type: application/json",
                "-D", "-", "-d", json.dumps(body), f"{api.base_url}/chat/completions"]  # fmt: skip
        done = await trio.run_process(args, capture_stdout=True)
        head, _, raw = done.stdout.decode().partition("\r\n\r\n")
        assert "content-type: text/event-stream" in head.lower()
        assert "x-p2pedge-route: local" in head.lower()
        events = raw.split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
        assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
        assert {c["id"] for c in chunks} == {chunks[0]["id"]}
        whole = await trio.run_process(
            ["curl", "-sS", "--max-time", "30", "-H", "content-type: application/json", "-d",
             json.dumps({**body, "stream": False, "stream_options": None}),
             f"{api.base_url}/chat/completions"],
            capture_stdout=True,
        )  # fmt: skip
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
        assert json.loads(whole.stdout)["choices"][0]["message"]["content"] == text
