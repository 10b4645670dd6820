"""The server's life beyond single requests: an engine failure answers 500 to the requests it hit (before or during
their stream) and later requests are served as usual; SIGTERM lets a request in flight finish, then exits cleanly."""
import asyncio
import signal
import threading

import httpx
import openai

import minidu
from minidu.server.app import build_app
from minidu.server.engine_loop import EngineLoop
from minidu.server.prometheus import ServerMetrics
from tests.server.conftest import MAX_MODEL_LEN, MODEL, start_server, stop_server

OK = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True}


def test_engine_failure_is_a_500_and_the_server_goes_on(checkpoint, monkeypatch):
    engine = minidu.Engine(str(checkpoint), max_model_len=MAX_MODEL_LEN)
    expected = engine.generate(["Hi"], minidu.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                               use_tqdm=False)[0].text
    real_step = engine.step
    fail_at = {tuple(engine.tokenizer.encode("Fail now")): 0, tuple(engine.tokenizer.encode("Fail later")): 1}

    def failing_step():  # fails the step that would give "Fail now" its 1st token and "Fail later" its 2nd
        for seq in [*engine.scheduler.waiting, *engine.scheduler.running]:
            if fail_at.get(tuple(seq.token_ids[:seq.num_prompt_tokens])) == seq.num_output_tokens:
                raise RuntimeError("injected failure")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    loop = EngineLoop(engine, ServerMetrics(MODEL))
    app = build_app(loop, MODEL)
    loop.start()

    async def requests():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://server") as c:
            return [await c.post("/v1/completions", json=OK | extra) for extra in (
                {"prompt": "Fail now"}, {"prompt": "Fail later", "stream": True}, {})]

    try:
        failed, failed_mid_stream, served = asyncio.run(requests())
        bm = engine.scheduler.block_manager
        all_free = loop.call(lambda e: bm.num_free_blocks == bm.num_blocks).result(timeout=60)
    finally:
        loop.shutdown()
    assert failed.status_code == 500 and "injected failure" in failed.json()["error"]["message"]
    events = failed_mid_stream.text.split("\n\n")
    assert failed_mid_stream.status_code == 200 and '"text":"' in events[0]
    assert "injected failure" in events[-3] and events[-2] == "data: [DONE]"
    assert served.status_code == 200 and served.json()["choices"][0]["text"] == expected
    assert all_free


def test_sigterm_lets_the_request_in_flight_finish(checkpoint, tmp_path):
    server = start_server(checkpoint, tmp_path / "server.log")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    chunks, first = [], threading.Event()

    def stream():
        for chunk in client.completions.create(model=MODEL, prompt="Go", max_tokens=8, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}):
            chunks.append(chunk)
            first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        assert first.wait(120)
        assert stop_server(server) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        if server.process.poll() is None:
            server.process.kill()
        reader.join(120)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 8
    assert "Application shutdown complete" in server.log.read_text()
