"""Many clients at once: 16 concurrent streams each get the greedy text they get alone, a client that leaves
mid-stream is aborted without disturbing the others, and afterwards every KV block is free."""
import asyncio
import threading

import httpx
import openai

from tests.server.conftest import MODEL

PROMPTS = [f"{chr(65 + i)}{i} says" for i in range(16)]
PARAMS = {"temperature": 0, "max_tokens": 3, "extra_body": {"ignore_eos": True}}


async def stream_text(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, int]:
    text, usage = "", None
    async for chunk in await client.completions.create(model=MODEL, prompt=prompt, stream=True, **PARAMS):
        text += chunk.choices[0].text if chunk.choices else ""
        usage = chunk.usage or usage
    return text, usage.completion_tokens


def test_16_concurrent_streams_match_alone_and_free_all_blocks(server, client):
    alone = [client.completions.create(model=MODEL, prompt=p, **PARAMS) for p in PROMPTS]

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(stream_text(aclient, p) for p in PROMPTS))

    assert asyncio.run(together()) == [(a.choices[0].text, a.usage.completion_tokens) for a in alone]
    assert len({a.choices[0].text for a in alone}) > 1  # the prompts really differ in what they produce
    server.wait_idle()
    assert server.metric("vllm:kv_cache_usage_perc") == 0.0


def test_disconnect_aborts_and_others_are_unaffected(server, client):
    expected = client.completions.create(model=MODEL, prompt="Steady", **PARAMS).choices[0].text
    aborted_before = server.metric("vllm:request_success_total", finished_reason="abort")
    tokens_before = server.metric("vllm:generation_tokens_total")
    other: list = []
    steady = threading.Thread(target=lambda: other.append(
        client.completions.create(model=MODEL, prompt="Steady", **PARAMS).choices[0].text))
    body = {"model": MODEL, "prompt": "Leaving", "max_tokens": 40, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        steady.start()
        next(line for line in response.iter_lines() if line.startswith("data:"))  # mid-stream: one chunk in
    steady.join()
    server.wait_idle()
    assert other == [expected]
    assert server.metric("vllm:request_success_total", finished_reason="abort") == aborted_before + 1
    assert server.metric("vllm:generation_tokens_total") - tokens_before < 40 + 3  # the leaver stopped early
    assert server.metric("vllm:kv_cache_usage_perc") == 0.0
