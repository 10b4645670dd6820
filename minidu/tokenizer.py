"""Text <-> token ids through a `tokenizers.Tokenizer`, with incremental detokenization for streaming and stop strings."""
import functools
import json
import os
from dataclasses import dataclass, field

from tokenizers import Tokenizer as _HFTokenizer


@dataclass(slots=True)
class Tokenizer:
    tokenizer: _HFTokenizer
    add_bos: bool = False  # prepend bos_token_id when the tokenizer's own post-processor does not
    bos_token_id: int | None = None
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token/eos_token strings for chat templates
    eot_token_ids: list[int] = field(default_factory=list)  # tokens that end a chat turn

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer | None":
        """Loads `tokenizer.json` (and `tokenizer_config.json` when present) from a model directory; None if absent."""
        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            return None
        try:
            tok = _HFTokenizer.from_file(file)
        except Exception as e:
            raise ValueError(f"{file}: cannot be read as a tokenizers file: {e}") from e
        config_file = os.path.join(path, "tokenizer_config.json")
        config = {}
        if os.path.exists(config_file):
            with open(config_file) as f:
                config = json.load(f)
        specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")
                    if _token_text(config.get(k)) is not None}
        bos = tok.token_to_id(specials["bos_token"]) if "bos_token" in specials else None
        adds_bos_itself = bos is not None and tok.encode("a").ids[:1] == [bos]
        add_bos = bool(config.get("add_bos_token", False)) and not adds_bos_itself
        eos = tok.token_to_id(specials["eos_token"]) if "eos_token" in specials else None
        return cls(tok, add_bos, bos, config.get("chat_template"), specials, [] if eos is None else [eos])

    @classmethod
    def from_gguf(cls, path: str) -> "Tokenizer":
        """The vocabulary, BOS handling and chat template stored in a GGUF file's metadata."""
        from minidu.gguf_tokenizer import tokenizer_from_gguf
        from minidu.models.gguf_loader import read_gguf_metadata

        info = tokenizer_from_gguf(read_gguf_metadata(path))
        names = {k: info.tokenizer.id_to_token(i) for k, i in (("bos_token", info.bos_token_id),
                                                               ("eos_token", info.eos_token_id)) if i is not None}
        return cls(info.tokenizer, False, info.bos_token_id, info.chat_template, names, info.eot_token_ids)

    @classmethod
    def from_path(cls, path: str) -> "Tokenizer | None":
        return cls.from_gguf(path) if path.endswith(".gguf") else cls.from_dir(path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Renders `messages` with the model's chat template (jinja2, as Hugging Face does) and encodes the result."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template (tokenizer_config.json chat_template or "
                             "GGUF tokenizer.chat_template)")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError("messages must be a list of {'role': str, 'content': str} dicts")
        text = _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        writes_bos = "bos_token" in self.special_tokens and text.startswith(self.special_tokens["bos_token"])
        return self.encode(text, add_special_tokens=not writes_bos)


@functools.cache
def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


# Prompt tokens decoded before the first output token: enough context for the decoder's spacing rules (vLLM's value).
INITIAL_DETOKENIZATION_OFFSET = 5


@dataclass(slots=True)
class IncrementalDetokenizer:
    """A request's output text, decoded a few tokens at a time as vLLM does: each step decodes the window
    ids[prefix_offset:] against ids[prefix_offset:read_offset] and keeps the difference. Starting the window inside
    the prompt keeps a SentencePiece model's leading space on the first output token, and text is held back while it
    ends in U+FFFD (a multi-byte character split across tokens)."""

    tokenizer: "Tokenizer"
    prefix_offset: int
    read_offset: int
    text: str = ""

    @classmethod
    def for_prompt(cls, tokenizer: "Tokenizer", num_prompt_tokens: int) -> "IncrementalDetokenizer":
        return cls(tokenizer, max(num_prompt_tokens - INITIAL_DETOKENIZATION_OFFSET, 0), num_prompt_tokens)

    def update(self, token_ids: list[int], finished: bool = False) -> str:
        """Appends the text that token_ids (prompt + output so far) settle; when finished, the rest as well."""
        if self.read_offset >= len(token_ids):
            return self.text
        prefix_text = self.tokenizer.decode(token_ids[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(token_ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and (finished or not new_text.endswith("\ufffd")):
            self.text += new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return self.text


def find_stop(text: str, stops: list[str] | None, start: int = 0) -> int | None:
    """Index where the earliest stop string begins in `text` (searching from about `start`), or None."""
    if not stops:
        return None
    hits = [i for s in stops if (i := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None
