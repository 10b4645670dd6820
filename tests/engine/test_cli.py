"""`python -m minidu generate|chat`: streamed output equals what the Engine API returns; bad arguments exit with a
message instead of a traceback."""
import json

import pytest

import minidu
from minidu.__main__ import main
from tests.engine.helpers import TEMPLATE
from tests.models.checkpoints import write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    write_checkpoint(path, tokenizer=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TEMPLATE}))
    return path


def test_generate_streams_the_engine_greedy_text(checkpoint, capsys):
    main(["generate", "--model", str(checkpoint), "--prompt", "Hello", "--max-tokens", "5", "--ignore-eos"])
    streamed = capsys.readouterr()
    engine = minidu.Engine(str(checkpoint))
    expected = engine.generate(["Hello"], minidu.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                               use_tqdm=False)[0]
    assert streamed.out == expected.text + "\n"
    assert "[5 tokens, finish_reason=length]" in streamed.err


def test_generate_with_token_ids(checkpoint, capsys):
    main(["generate", "--model", str(checkpoint), "--prompt", "1,40,41", "--max-tokens", "3", "--ignore-eos"])
    assert "[3 tokens" in capsys.readouterr().err


def test_chat_uses_the_template(checkpoint, capsys):
    main(["chat", "--model", str(checkpoint), "--max-tokens", "4", "--system", "Be brief.", "Hi!"])
    streamed = capsys.readouterr()
    engine = minidu.Engine(str(checkpoint))
    expected = engine.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
                           minidu.SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert streamed.out == expected.text + "\n"


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/model", "--prompt", "x"], "no/such/model"),
    (["generate", "--model", "qwen3-0.6b", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["chat", "--model", "qwen3-0.6b", "--tensor-parallel-size", "0", "Hi"], "tensor_parallel_size must be an int"),
])
def test_bad_arguments_exit_with_a_message(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)
