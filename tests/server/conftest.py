"""One `python -m minidu serve` process on a tiny random Llama (character tokenizer, a chat template) shared by the
server tests, with helpers to talk to it and read its metrics."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.models.checkpoints import write_checkpoint

MODEL = "tiny"
MAX_MODEL_LEN = 64
NUM_KV_BLOCKS = 64
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ROOT = Path(__file__).resolve().parents[2]


@dataclass(slots=True)
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            series, _, value = line.rpartition(" ")
            if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Waits until no request is running or waiting (a bound, not a speed check)."""
        deadline = time.monotonic() + timeout
        while self.metric("vllm:num_requests_running") or self.metric("vllm:num_requests_waiting"):
            assert time.monotonic() < deadline, "the server did not go idle"
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve-model")
    write_checkpoint(path, tokenizer=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TEMPLATE}))
    return path


def start_server(checkpoint: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "minidu", "serve", "--model", str(checkpoint), "--served-model-name", MODEL,
            "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", str(NUM_KV_BLOCKS),
            "--block-size", "4", "--max-num-seqs", "16", "--max-num-batched-tokens", "128", *extra]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env=os.environ | {"PYTHONUNBUFFERED": "1"})
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, f"the server exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"the server did not come up:\n{log.read_text()}"
        try:
            if httpx.get(f"{server.url}/health").status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)


def stop_server(server: Server) -> int:
    server.process.send_signal(signal.SIGTERM)
    return server.process.wait(timeout=60)


@pytest.fixture(scope="session")
def server(checkpoint, tmp_path_factory):
    server = start_server(checkpoint, tmp_path_factory.mktemp("serve-log") / "server.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
