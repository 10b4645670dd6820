"""Tensor parallelism as one rank sees it: its rank, the number of ranks and the torch.distributed group its collectives
run on; the Megatron-style share of the model each rank holds, the shard of every checkpoint tensor, and the two
collectives the sharded forward needs. Size 1 is the plain single-process model."""
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from minidu.models.config import ModelConfig


@dataclass(slots=True, frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None when size is 1

    def __post_init__(self):
        assert 0 <= self.rank < self.size, (self.rank, self.size)
        assert self.size == 1 or self.group is not None, "more than one rank needs a process group"


@dataclass(slots=True, frozen=True)
class RankLayout:
    """The part of a model one rank holds: whole heads (q heads split evenly; kv heads split, or each replicated on
    size / num_kv_heads ranks when there are fewer kv heads than ranks, as vLLM does), an even slice of the MLP, and
    ceil(vocab / size) vocabulary rows (the last shard padded), as scheduler.roofline.ModelShape counts them."""

    num_heads: int
    kv_head_start: int
    num_kv_heads: int
    intermediate_size: int
    vocab_start: int
    vocab_stop: int
    vocab_rows: int  # every rank's embedding / lm_head rows, padding included

    @classmethod
    def of(cls, config: ModelConfig, tp: TensorParallel) -> "RankLayout":
        n, r, kv = tp.size, tp.rank, config.num_key_value_heads
        for name in ("num_attention_heads", "intermediate_size"):
            if getattr(config, name) % n:
                raise ValueError(f"tensor_parallel_size={n} must divide {name} ({getattr(config, name)})")
        if kv % n if kv >= n else n % kv:
            raise ValueError(f"tensor_parallel_size={n} must divide num_key_value_heads ({kv}) or be a multiple of "
                             f"it (kv heads are split across ranks, or replicated when fewer than ranks)")
        vocab_rows = -(-config.vocab_size // n)
        vocab_start = min(r * vocab_rows, config.vocab_size)
        return cls(num_heads=config.num_attention_heads // n,
                   kv_head_start=r * kv // n, num_kv_heads=max(1, kv // n),
                   intermediate_size=config.intermediate_size // n,
                   vocab_start=vocab_start, vocab_stop=min(vocab_start + vocab_rows, config.vocab_size),
                   vocab_rows=vocab_rows)


@dataclass(slots=True, frozen=True)
class Shard:
    """The part of a checkpoint tensor of `full_shape` one rank holds: indices [start, stop) along `dim`, or the whole
    tensor when dim is None."""

    full_shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    stop: int = 0

    @classmethod
    def slice(cls, full_shape: tuple[int, ...], dim: int, start: int, count: int) -> "Shard":
        if start == 0 and count == full_shape[dim]:
            return cls(full_shape)  # readers take the whole tensor their fastest way
        return cls(full_shape, dim, start, start + count)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        return self.full_shape[:self.dim] + (self.stop - self.start,) + self.full_shape[self.dim + 1:]

    def index(self) -> tuple[slice, ...]:
        """The basic index that takes the shard out of the full tensor (torch, numpy and safetensors slices)."""
        if self.dim is None:
            return (slice(None),)
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)


@dataclass(slots=True, frozen=True)
class CheckpointTensor:
    """A checkpoint tensor not read yet: its full shape, and a reader of any shard of it that reads only that shard."""

    shape: tuple[int, ...]
    read: Callable[[Shard], torch.Tensor]


def all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sums x in place over the ranks (the partial products of a row-parallel GEMM); x itself at size 1."""
    if tp.size > 1:
        dist.all_reduce(x, group=tp.group)
    return x


def gather_vocab(logits: torch.Tensor, tp: TensorParallel, vocab_size: int) -> torch.Tensor:
    """[B, vocab_rows] of this rank's vocabulary shard -> the full [B, vocab_size] logits, the same on every rank."""
    if tp.size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp.size)]
    dist.all_gather(parts, logits, group=tp.group)
    return torch.cat(parts, dim=1)[:, :vocab_size]
