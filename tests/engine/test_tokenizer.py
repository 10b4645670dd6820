"""Incremental detokenization: streamed text equals the full decode's continuation of the prompt, with multi-byte
characters split across byte-level tokens and SentencePiece's leading space after the prompt."""

import pytest
from hypothesis import given, strategies as st
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from minidu.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.models.checkpoints import STORIES260K



def byte_level() -> Tokenizer:
    """One token per byte (no merges): every non-ASCII character spans several tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok)


def sentencepiece_like() -> Tokenizer:
    """Word pieces marked with ▁ whose decoder drops the first piece's leading space, as SentencePiece does."""
    words = ["<unk>", "▁Once", "▁upon", "▁a", "▁time", "▁there", "▁was", "▁cat"]
    tok = HFTokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return Tokenizer(tok)


def stream(tokenizer: Tokenizer, prompt: list[int], output: list[int]) -> tuple[str, list[str]]:
    """The final text and the text after each step when output arrives one token at a time."""
    detok = IncrementalDetokenizer.for_prompt(tokenizer, len(prompt))
    texts = [detok.update(prompt + output[:i + 1], finished=i == len(output) - 1) for i in range(len(output))]
    return texts[-1], texts


@given(st.text(alphabet="aé€😀 z\n", min_size=1, max_size=6), st.text(alphabet="aé€😀 z\n", min_size=1, max_size=8))
def test_streamed_text_is_the_continuation_of_the_prompt(prompt_text, output_text):
    tokenizer = byte_level()
    prompt, output = tokenizer.encode(prompt_text), tokenizer.encode(output_text)
    final, texts = stream(tokenizer, prompt, output)
    assert final == output_text
    # Never a half character on the way, and the text only grows.
    assert all("\ufffd" not in t for t in texts)
    assert all(output_text.startswith(t) for t in texts)


def test_split_character_is_held_back_until_complete():
    tokenizer = byte_level()
    output = tokenizer.encode("é")
    assert len(output) == 2
    _, texts = stream(tokenizer, tokenizer.encode("a"), output)
    assert texts == ["", "é"]


def test_sentencepiece_leading_space_after_the_prompt():
    tokenizer = sentencepiece_like()
    prompt, output = tokenizer.encode("Once upon"), tokenizer.encode("a time")
    assert tokenizer.decode(output) == "a time"  # decoding the output alone loses the space
    final, texts = stream(tokenizer, prompt, output)
    assert texts == [" a", " a time"]
    assert tokenizer.decode(prompt) + final == tokenizer.decode(prompt + output)


@pytest.mark.skipif(not STORIES260K.is_dir(), reason="needs ../shared/models/stories260k")
def test_stories260k_tokenizer_keeps_the_leading_space():
    tokenizer = Tokenizer.from_dir(str(STORIES260K))
    prompt = tokenizer.encode("Once upon a time")
    output = tokenizer.encode("there was a little girl", add_special_tokens=False)
    final, _ = stream(tokenizer, prompt, output)
    assert tokenizer.decode(prompt) + final == tokenizer.decode(prompt + output)
    assert final.startswith(" ")
