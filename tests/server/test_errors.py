"""Bad requests get a 4xx with an OpenAI error body whose message names the problem; the server stays up and a good
request afterwards is answered as before."""
import json

import httpx
import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL

OK = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

CASES = [  # (route, body, status, words the message must contain)
    ("completions", b"{not json", 400, ["JSON"]),
    ("completions", OK | {"model": "gpt-4"}, 404, ["gpt-4"]),
    ("completions", {"prompt": "Hi"}, 400, ["model", "required"]),
    ("completions", {"model": MODEL}, 400, ["prompt", "required"]),
    ("completions", OK | {"max_tokens": "two"}, 400, ["max_tokens", "integer"]),
    ("completions", OK | {"prompt": {"text": "Hi"}}, 400, ["prompt"]),
    ("completions", OK | {"max_tokens": 0}, 400, ["max_tokens", "greater than or equal to 1"]),
    ("completions", OK | {"max_tokens": -3}, 400, ["max_tokens"]),
    ("completions", OK | {"temperature": -0.5}, 400, ["temperature", "greater than or equal to 0"]),
    ("completions", OK | {"top_p": 0}, 400, ["top_p", "greater than 0"]),
    ("completions", OK | {"top_p": 1.5}, 400, ["top_p", "less than or equal to 1"]),
    ("completions", OK | {"prompt": "x" * (MAX_MODEL_LEN + 5)}, 400, ["prompt", f"{MAX_MODEL_LEN}"]),
    ("completions", OK | {"max_tokens": MAX_MODEL_LEN}, 400, ["max_tokens", "context length"]),
    ("completions", OK | {"prompt": [1, 5, 128]}, 400, ["prompt", "[0, 128)", "128"]),
    ("completions", OK | {"prompt": [1, -1]}, 400, ["prompt", "-1"]),
    ("completions", OK | {"stop": [""]}, 400, ["stop"]),
    ("completions", OK | {"temperature": 1e39}, 400, ["temperature", "float32"]),  # found by the fuzz test
    ("completions", OK | {"top_p": 1e-46}, 400, ["top_p", "float32"]),
    ("completions", OK | {"logit_bias": {"5": 10}}, 400, ["logit_bias", "not permitted"]),
    ("completions", OK | {"n": 2}, 400, ["n"]),
    ("completions", OK | {"prompt": "x" * (2 << 20)}, 413, ["limit"]),
    ("chat/completions", CHAT | {"messages": []}, 400, ["messages"]),
    ("chat/completions", CHAT | {"messages": [{"role": "robot", "content": "Hi"}]}, 400, ["role"]),
    ("chat/completions", CHAT | {"messages": [{"role": "user"}]}, 400, ["content", "required"]),
]


@pytest.mark.parametrize("route, body, status, words", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_bad_request_is_4xx_naming_the_problem(server, route, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/{route}", content=content, headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and all(w in error["message"] for w in words), error["message"]


def test_bad_stream_request_gets_a_status_not_a_stream(server):
    response = httpx.post(f"{server.url}/v1/completions", json=OK | {"stream": True, "top_p": 2}, timeout=60)
    assert response.status_code == 400 and "top_p" in response.json()["error"]["message"]


def test_server_stays_up_and_answers_alike(server):
    first = httpx.post(f"{server.url}/v1/completions", json=OK, timeout=60)
    for route, body, _, _ in CASES[:3]:
        httpx.post(f"{server.url}/v1/{route}", content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                   headers={"content-type": "application/json"}, timeout=60)
    again = httpx.post(f"{server.url}/v1/completions", json=OK, timeout=60)
    assert first.status_code == again.status_code == 200
    assert first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]
