"""A request as the scheduler sees it: its tokens, how many of them have KV in the cache, and its blocks."""
import itertools
from dataclasses import dataclass, field
from enum import Enum, auto


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_seq_ids = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    """One request. `token_ids` holds the prompt then the generated tokens; the first `num_computed_tokens` of them
    have their KV in the cache (prefix-cache hits included)."""

    request_id: str
    token_ids: list[int]
    max_tokens: int
    arrival_time: float = 0.0
    stop_token_ids: frozenset[int] = frozenset()  # eos ids (unless ignore_eos) and the request's own stop ids
    params: object = None  # the request's SamplingParams; opaque to the scheduler
    seed: int = 0  # the sampler's per-request seed
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prefix-cache hits at the last admission
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0

    def __post_init__(self):
        assert self.token_ids, "a sequence needs at least one token"
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
