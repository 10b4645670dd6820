"""Turns an OpenAI request into what the engine takes (prompt token ids, SamplingParams), refusing with an APIError
(HTTP 400) whatever the engine could not run: a prompt too long or outside the vocabulary, bad sampling values."""
import dataclasses

import numpy as np

from minidu.engine import Engine
from minidu.sampling_params import SamplingParams
from minidu.server.protocol import ChatCompletionRequest, CompletionRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class APIError(Exception):
    """An error answered to the client as an OpenAI error body with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type: str = "BadRequestError"):
        super().__init__(message)
        self.message, self.status, self.param, self.type = message, status, param, type


def completion_input(engine: Engine, req: CompletionRequest) -> tuple[list[int], SamplingParams]:
    if isinstance(req.prompt, str):
        if engine.tokenizer is None:
            raise APIError("this model has no tokenizer: pass the prompt as a list of token ids", param="prompt")
        ids = engine.tokenizer.encode(req.prompt)
    else:
        ids = req.prompt
        vocab = engine.model_config.vocab_size
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise APIError(f"prompt token ids must lie in [0, {vocab}) (the vocabulary), got {bad[:5]}",
                           param="prompt")
    _check_length(engine, ids, "prompt")
    return ids, sampling_params(engine, req, len(ids), COMPLETION_DEFAULT_MAX_TOKENS)


def chat_input(engine: Engine, req: ChatCompletionRequest) -> tuple[list[int], SamplingParams]:
    from jinja2 import TemplateError

    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        ids, stops = engine.chat_request(messages, SamplingParams())
    except (ValueError, TemplateError) as e:
        raise APIError(f"messages: {e}", param="messages") from e
    _check_length(engine, ids, "messages")
    params = sampling_params(engine, req, len(ids), None)
    extra = set(params.stop_token_ids or ()) | set(stops.stop_token_ids)
    return ids, dataclasses.replace(params, stop_token_ids=sorted(extra))


def _check_length(engine: Engine, ids: list[int], param: str) -> None:
    if not ids:
        raise APIError(f"{param} is empty", param=param)
    if len(ids) >= engine.max_model_len:
        raise APIError(f"{param} has {len(ids)} tokens, which leaves no room to generate within this model's maximum "
                       f"context length of {engine.max_model_len} tokens", param=param)


def sampling_params(engine: Engine, req, num_prompt_tokens: int, default_max_tokens: int | None) -> SamplingParams:
    room = engine.max_model_len - num_prompt_tokens
    max_tokens = req.max_tokens
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    elif max_tokens > room:
        raise APIError(f"max_tokens={max_tokens} plus the prompt's {num_prompt_tokens} tokens exceeds this model's "
                       f"maximum context length of {engine.max_model_len} tokens", param="max_tokens")
    _check_float32(req)
    try:
        return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, max_tokens=max_tokens,
                              stop_token_ids=req.stop_token_ids, stop=req.stop, ignore_eos=req.ignore_eos,
                              seed=req.seed)
    except ValueError as e:
        raise APIError(str(e)) from e


def _check_float32(req) -> None:
    """The sampler holds temperature and top_p as float32: refuse values that become inf or 0 there."""
    if not np.isfinite(np.float32(req.temperature)):
        raise APIError(f"temperature={req.temperature} overflows the sampler's float32", param="temperature")
    if np.float32(req.top_p) == 0:
        raise APIError(f"top_p={req.top_p} rounds to 0 in the sampler's float32; top_p must be in (0, 1]",
                       param="top_p")
