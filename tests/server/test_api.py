"""The OpenAI routes through the official `openai` client: streamed text concatenated equals the non-streamed text, the
text is what minidu.Engine generates in-process, usage counts the tokenizer's tokens, stop strings cut alike."""
import httpx
import pytest

import minidu
from minidu.tokenizer import Tokenizer
from tests.server.conftest import MAX_MODEL_LEN, MODEL

GREEDY = {"temperature": 0, "max_tokens": 4, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def tokenizer(checkpoint) -> Tokenizer:
    return Tokenizer.from_dir(str(checkpoint))


def streamed_completion(client, **kwargs) -> tuple[str, list]:
    chunks = list(client.completions.create(model=MODEL, stream=True, **kwargs))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_models_and_health(server, client):
    assert [(m.id, m.max_model_len) for m in client.models.list().data] == [(MODEL, MAX_MODEL_LEN)]
    assert httpx.get(f"{server.url}/health").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain") and "vllm:num_requests_running" in metrics.text


def test_completion_is_the_engine_text_streamed_or_not(client, checkpoint, tokenizer):
    whole = client.completions.create(model=MODEL, prompt="Once upon", **GREEDY)
    text, chunks = streamed_completion(client, prompt="Once upon", **GREEDY)
    engine = minidu.Engine(str(checkpoint), max_model_len=MAX_MODEL_LEN)
    expected = engine.generate(["Once upon"], minidu.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                               use_tqdm=False)[0]
    assert whole.choices[0].text == text == expected.text
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer.encode("Once upon"))
    for usage in (whole.usage, chunks[-1].usage):
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
            prompt_tokens, 4, prompt_tokens + 4)


def test_token_id_prompt_and_usage_chunk(client):
    whole = client.completions.create(model=MODEL, prompt=[1, 40, 41, 42], **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt=[1, 40, 41, 42], stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == 4


def test_stop_string_cuts_streamed_and_whole_alike(client):
    full = client.completions.create(model=MODEL, prompt="Hello", **GREEDY).choices[0].text
    stop = full[1:3]
    assert len(stop) == 2
    cut = full[:full.find(stop)]
    whole = client.completions.create(model=MODEL, prompt="Hello", stop=[stop], **GREEDY)
    text, chunks = streamed_completion(client, prompt="Hello", stop=[stop], **GREEDY)
    assert whole.choices[0].text == text == cut
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"


def test_chat_streamed_equals_whole(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=5)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=5,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert whole.choices[0].message.content == streamed and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == len(tokenizer.apply_chat_template(messages))
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens <= 5
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason
