"""Builds a `tokenizers.Tokenizer` from the tokenizer.* metadata of a GGUF file: byte-level BPE ("gpt2")
or SentencePiece-style BPE with byte fallback ("llama"), plus BOS/EOS/end-of-turn ids and the chat template."""
from dataclasses import dataclass, field

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# tokenizer.ggml.token_type values (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                   r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# tokenizer.ggml.pre names (llama.cpp's llama-vocab.cpp) grouped by the pre-tokenizer they select.
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "stablelm2"}
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
# Chat models that predate the eot/eom metadata keys still end turns with one of these control tokens.
_END_OF_TURN_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>")


@dataclass(slots=True)
class GGUFTokenizerInfo:
    """A ready tokenizer and the generation-relevant ids of a GGUF vocabulary.

    `tokenizer.encode(text)` already prepends BOS where the vocabulary asks for it (add_special_tokens=True); encode
    a rendered chat template with add_special_tokens=False when the template writes BOS itself.
    """
    tokenizer: Tokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str | None
    eot_token_ids: list[int] = field(default_factory=list)


def _gpt2_pre_tokenizer(pre: str):
    """The split regex llama.cpp uses for `pre`, followed by byte-level mapping; unknown names get GPT-2's."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        pattern = _LLAMA3_PATTERN if pre in _LLAMA3_PRE else _QWEN2_PATTERN
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
    split = pre_tokenizers.Split(Regex(_GPT2_PATTERN), behavior="isolated")
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), split, byte_level])
    return pre_tokenizers.Sequence([split, byte_level])


def _gpt2_tokenizer(meta: dict, tokens: list[str]) -> Tokenizer:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError("metadata lacks tokenizer.ggml.merges, required by a gpt2 tokenizer")
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"tokenizer.ggml.merges entry {merge!r} is not 'left right'")
        pairs.append((left, right))
    pre = meta.get("tokenizer.ggml.pre", "default")
    vocab = {text: i for i, text in enumerate(tokens)}
    # llama.cpp looks whole llama3-style words up in the vocabulary before merging.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _LLAMA3_PRE))
    tokenizer.pre_tokenizer = _gpt2_pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal token into two normal tokens, best merged-token score first.

    SentencePiece BPE (and llama.cpp's "llama" tokenizer) repeatedly merges the adjacent pair whose
    concatenation has the highest score; ranking merges by that score reproduces it with a rank-based BPE.
    Byte, control and user-defined tokens are never formed from text, so they take no part.
    """
    normal = {text: i for i, text in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for text, i in normal.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _llama_tokenizer(meta: dict, tokens: list[str], types: list[int]) -> Tokenizer:
    scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    if len(scores) != len(tokens):
        raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", types.index(UNKNOWN) if UNKNOWN in types else None)
    vocab = {text: i for i, text in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), byte_fallback=True,
                                     unk_token=tokens[unk_id] if unk_id is not None else None, fuse_unk=True))
    # llama.cpp escapes spaces to U+2581 and, by default, prefixes every text fragment (the start and the
    # text after each special token) with one; normalizers run per fragment, so Prepend matches that.
    replace = normalizers.Replace(" ", "\u2581")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tokenizer.normalizer = replace
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control and user-defined tokens are matched in raw text before any splitting, so they are never split."""
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED])


def _token_id(meta: dict, key: str, n_tokens: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}_token_id")
    if value is None:
        return None
    if not 0 <= int(value) < n_tokens:
        raise ValueError(f"tokenizer.ggml.{key}_token_id={value} is outside the vocabulary of {n_tokens} tokens")
    return int(value)


def _end_of_turn_ids(meta: dict, tokens: list[str], types: list[int], eos: int | None) -> list[int]:
    ids = [i for i in (eos, _token_id(meta, "eot", len(tokens)), _token_id(meta, "eom", len(tokens)))
           if i is not None]
    ids += [i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == CONTROL and t in _END_OF_TURN_TEXTS]
    return list(dict.fromkeys(ids))


def tokenizer_from_gguf(meta: dict) -> GGUFTokenizerInfo:
    """Tokenizer and special ids from GGUF metadata (e.g. `minidu.models.gguf_loader.read_gguf_metadata`)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("metadata lacks tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        tokenizer = _gpt2_tokenizer(meta, tokens)
    elif kind == "llama":
        tokenizer = _llama_tokenizer(meta, tokens, types)
    else:
        raise ValueError(f"tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2', 'llama')")
    _add_special_tokens(tokenizer, tokens, types)
    bos, eos = _token_id(meta, "bos", len(tokens)), _token_id(meta, "eos", len(tokens))
    # llama.cpp's defaults when the key is absent: SentencePiece and Llama-3 vocabularies add BOS, other BPE ones not.
    default_add_bos = kind == "llama" or meta.get("tokenizer.ggml.pre") in _LLAMA3_PRE
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)) and bos is not None
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)])
    return GGUFTokenizerInfo(tokenizer=tokenizer, bos_token_id=bos, eos_token_id=eos,
                             chat_template=meta.get("tokenizer.chat_template"),
                             eot_token_ids=_end_of_turn_ids(meta, tokens, types, eos))
