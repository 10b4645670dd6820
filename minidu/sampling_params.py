"""Per-request sampling options, named as in vLLM; invalid values raise ValueError at construction, so every value
that reaches the sampling kernel fits its types (float32 temperature/top_p, int32 top_k, int64 seed)."""
from dataclasses import dataclass

import numpy as np

# Below this temperature the distribution is the greedy limit (vLLM's _SAMPLING_EPS); dividing logits by a smaller
# value overflows float32.
GREEDY_TEMPERATURE = 1e-5
_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy; values below GREEDY_TEMPERATURE become 0
    top_k: int = -1  # -1 (or 0) keeps the whole vocabulary
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list[int] | None = None
    stop: list[str] | str | None = None
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        if not _is_number(self.temperature) or not 0 <= self.temperature <= _FLOAT32_MAX:
            raise ValueError(f"temperature must be a finite number >= 0 (at most float32's max), "
                             f"got {self.temperature!r}")
        self.temperature = 0.0 if self.temperature < GREEDY_TEMPERATURE else float(self.temperature)
        if not _is_int(self.top_k) or not -1 <= self.top_k <= _INT32_MAX:
            raise ValueError(f"top_k must be -1 (disabled) or an int in [0, 2**31 - 1], got {self.top_k!r}")
        self.top_k = int(self.top_k)
        # top_p travels as float32: it must stay above 0 there.
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1 or np.float32(self.top_p) == 0:
            raise ValueError(f"top_p must be in (0, 1] (and non-zero in float32), got {self.top_p!r}")
        self.top_p = float(self.top_p)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        self.max_tokens = int(self.max_tokens)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                    _is_int(t) and t >= 0 for t in self.stop_token_ids):
                raise ValueError(f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}")
            self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and (not isinstance(self.stop, (list, tuple))
                                      or not all(isinstance(s, str) and s for s in self.stop)):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if self.stop is not None:
            self.stop = list(self.stop)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [-2**63, 2**63), got {self.seed!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
