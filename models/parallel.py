"""Tensor parallelism as one rank sees it: its rank, the number of ranks, and the torch.distributed group its
collectives run on. The model shards its weights by it (Megatron-style); size 1 is the plain single-process model."""
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None when size is 1

    def __post_init__(self):
        assert 0 <= self.rank < self.size, (self.rank, self.size)
        assert self.size == 1 or self.group is not None, "more than one rank needs a process group"
