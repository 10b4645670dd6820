"""A streaming client that replays a workload against any OpenAI-compatible server (minidu serve, vLLM, SGLang) and
times each request on the client's clock, so that different servers are measured by one client."""
import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from minidu.outputs import RequestOutput
from minidu.benchmarks.workloads import RequestSpec, prompt_token_ids

PREEMPTIONS = "vllm:num_preemptions_total"


@dataclass(slots=True)
class ClientRun:
    model: str  # the name the server answered to (the first model it lists)
    outputs: list[RequestOutput]  # one per spec, in spec order, times on the client's perf_counter clock
    num_preemptions: int | None  # from the server's vLLM-style /metrics, when it exports them


def run_workload(base_url: str, specs: list[RequestSpec], *, vocab_size: int, seed: int = 0,
                 timeout_s: float = 3600.0) -> ClientRun:
    """Sends spec i at its arrival time as a streamed /v1/completions request: random prompt ids below vocab_size
    (from `seed`, as the in-process benchmark draws them), max_tokens output_len, ignore_eos, seed `seed + i`.

    A request's arrival is when it was sent, its first token time when the first non-empty text chunk came, and its
    token_times are the times of its text chunks: a server that sends several tokens in one chunk shows one gap (as
    vLLM's benchmark measures). A text stream carries a token count (usage), not ids: token_ids holds that many -1s.
    A request the server refused or failed has finish_reason "abort" and `error` set."""
    if not specs:
        raise ValueError("specs is empty")
    return asyncio.run(_run(base_url.rstrip("/"), specs, vocab_size, seed, timeout_s))


async def _run(base_url: str, specs: list[RequestSpec], vocab_size: int, seed: int, timeout_s: float) -> ClientRun:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        models = (await client.get("/v1/models")).raise_for_status().json()["data"]
        if not models:
            raise ValueError(f"{base_url}/v1/models lists no model")
        model = models[0]["id"]
        before = await _preemptions(client)
        start = time.perf_counter()
        outputs = await asyncio.gather(*(
            _request(client, model, spec, str(i), prompt_token_ids(spec.input_len, vocab_size, seed, i), seed + i,
                     start) for i, spec in enumerate(specs)))
        after = await _preemptions(client)
    return ClientRun(model, list(outputs), None if before is None or after is None else int(after - before))


async def _request(client: httpx.AsyncClient, model: str, spec: RequestSpec, request_id: str, prompt: list[int],
                   seed: int, start: float) -> RequestOutput:
    await asyncio.sleep(max(0.0, start + spec.arrival_time - time.perf_counter()))
    body = {"model": model, "prompt": prompt, "max_tokens": spec.output_len, "ignore_eos": True, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    arrival, times, reason, usage, error = time.perf_counter(), [], None, None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
            else:
                reason, usage, error = await _read_events(response, times)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        error = f"{type(e).__name__}: {e}"
    num_tokens = usage["completion_tokens"] if usage else len(times)
    return RequestOutput(request_id, prompt, [-1] * num_tokens, "", True, "abort" if error else reason, error=error,
                         arrival_time=arrival, first_token_time=times[0] if times else None, token_times=times)


async def _read_events(response: httpx.Response, times: list[float]) -> tuple[str | None, dict | None, str | None]:
    """Reads server-sent events to the end, appending the arrival time of each text chunk to `times`; returns the
    finish reason, the usage and an error the server sent in the stream."""
    reason, usage, error = None, None, None
    async for line in response.aiter_lines():
        if not line.startswith("data:") or (data := line[5:].strip()) == "[DONE]":
            continue
        event = json.loads(data)
        if "error" in event:
            error = str(event["error"].get("message", event["error"]))
        for choice in event.get("choices") or []:
            if choice.get("text"):
                times.append(time.perf_counter())
            reason = choice.get("finish_reason") or reason
        usage = event.get("usage") or usage
    return reason, usage, error


async def _preemptions(client: httpx.AsyncClient) -> float | None:
    """The server's preemption counter, or None if it has no vLLM-style /metrics."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    values = [float(line.split()[-1]) for line in response.text.splitlines() if line.startswith(PREEMPTIONS)]
    return sum(values) if response.status_code == 200 and values else None
