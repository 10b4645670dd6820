"""scripts/bench_serving.py --backend openai against the test server: every request completes, the token counts agree
with the server's own counters, and the client-side latencies are consistent."""
import json
import subprocess
import sys

from tests.server.conftest import ROOT

NUM_REQUESTS, INPUT_LEN, OUTPUT_LEN = 6, 8, 3


def test_openai_backend_measures_the_server(server, tmp_path):
    before = {m: server.metric(m) for m in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")}
    out = tmp_path / "r.json"
    argv = [sys.executable, "scripts/bench_serving.py", "--backend", "openai", "--base-url", server.url,
            "--workload", "fixed", "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--rate", "inf",
            "--num-requests", str(NUM_REQUESTS), "--vocab-size", "128", "--out", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    m = json.loads(out.read_text())
    assert m["num_requests"] == m["num_completed"] == NUM_REQUESTS and m["backend"] == "openai"
    assert server.metric("vllm:prompt_tokens_total") - before["vllm:prompt_tokens_total"] == NUM_REQUESTS * INPUT_LEN
    generated = server.metric("vllm:generation_tokens_total") - before["vllm:generation_tokens_total"]
    assert generated == NUM_REQUESTS * OUTPUT_LEN
    assert abs(m["output_tok_s"] * m["duration_s"] - generated) < 1e-6
    assert 0 < m["ttft_ms"]["p50"] <= m["ttft_ms"]["p99"] <= m["duration_s"] * 1e3
    assert 0 <= m["tbt_ms"]["p50"] <= m["tbt_ms"]["p99"] <= m["duration_s"] * 1e3
    assert 0 <= m["slo_attainment"] <= 1 and m["num_preemptions"] == 0
    assert f"{NUM_REQUESTS}/{NUM_REQUESTS} requests" in done.stdout
