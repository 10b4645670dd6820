"""Attention-aware roofline latency model: predicts how long one forward step over a batch of (new, cached) token counts
takes on a given SM budget, from operator FLOP and byte counts and the hardware profile."""
import bisect
from itertools import accumulate
from collections.abc import Sequence
from dataclasses import dataclass

from minidu.scheduler.hardware import HardwareProfile


@dataclass(slots=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that its step latency depends on (built from the model config)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2
    qk_norm: bool = False
    attention_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                     "vocab_size", "dtype_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")


@dataclass(frozen=True, slots=True)
class StepWork:
    """The (FLOPs, bytes) of every operator of one step, sorted by arithmetic intensity.

    Each operator takes max(FLOPs / compute, bytes / bandwidth); an operator is compute-bound exactly when its
    intensity FLOPs/bytes is at least the ridge compute/bandwidth, so with the operators sorted by intensity the sum
    over all of them is one binary search plus two prefix sums, whatever the SM budget.
    """

    intensities: tuple[float, ...]  # ascending FLOP/byte
    flops_from: tuple[float, ...]  # flops_from[i]: FLOPs of operators i and later
    bytes_before: tuple[float, ...]  # bytes_before[i]: bytes of operators before i
    num_layers: int  # layers whose fixed overhead the step pays (0 for an empty step)

    @classmethod
    def from_ops(cls, ops: list[tuple[float, float]], num_layers: int) -> "StepWork":
        ops = sorted(ops, key=lambda op: op[0] / op[1])
        flops_from = (*reversed(list(accumulate((f for f, _ in reversed(ops)), initial=0.0))),)
        bytes_before = (*accumulate((b for _, b in ops), initial=0.0),)
        return cls(tuple(f / b for f, b in ops), flops_from, bytes_before, num_layers)

    def roofline_time(self, flops_per_s: float, bytes_per_s: float) -> float:
        i = bisect.bisect_left(self.intensities, flops_per_s / bytes_per_s)
        return self.flops_from[i] / flops_per_s + self.bytes_before[i] / bytes_per_s


class LatencyModel:
    """Step time = sum over operators of max(FLOPs / compute(S), bytes / bandwidth(S)) + layer overhead.

    Per layer: the token-level operators see all T new tokens of the step (rms norms with the fused residual add,
    q/k/v, o, gate_up and down GEMMs, optional q/k norm, rotary, kv-cache store and silu_and_mul; elementwise operators
    are counted as bytes only). Attention is one roofline term per request, because requests of very different
    intensity (a long-context decode streaming its KV cache, a compute-bound prefill chunk) do not hide each other's
    cost. A request with q new tokens after c cached ones attends to exactly q*c + q*(q+1)/2 (query, key) pairs under
    the causal mask, 4*d per pair and query head (QK^T and PV); it reads its queries, writes its outputs and reads its
    q + c keys and values once at the kv heads (tiles of a request's queries re-read keys from L2, not HBM).
    After the layers: the final norm over T tokens and the LM head for one sampled row per request.
    Embedding lookup and sampling move O(T*H) and O(B*V) bytes, negligible next to the weights, and are left out.
    """

    def __init__(self, shape: ModelShape, hw: HardwareProfile):
        self.shape = shape
        self.hw = hw

    def work(self, requests: Sequence[tuple[int, int]]) -> StepWork:
        """The operators of a step over `requests`, each (q new tokens, c cached tokens)."""
        s, b = self.shape, self.shape.dtype_bytes
        tokens = 0
        for request in requests:
            if (len(request) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in request)
                    or request[0] < 1 or request[1] < 0):
                raise ValueError(f"requests must hold (q >= 1, c >= 0) int pairs, got {request!r}")
            tokens += request[0]
        if not requests:
            return StepWork.from_ops([], 0)
        layers = s.num_layers
        ops = [(f * layers, n * layers) for f, n in self._layer_ops(tokens)]
        ops += [(self._attention_flops(q, c) * layers, self._attention_bytes(q, c) * layers) for q, c in requests]
        ops.append(_elementwise(b * (4 * tokens * s.hidden_size + s.hidden_size)))  # final norm
        ops.append(_gemm(len(requests), s.vocab_size, s.hidden_size, b, bias=False))  # LM head
        return StepWork.from_ops(ops, layers)

    def time(self, work: StepWork, num_sms: int) -> float:
        """Predicted seconds for `work` on `num_sms` SMs."""
        compute, bandwidth = self.hw.compute(num_sms), self.hw.bandwidth(num_sms)
        return work.roofline_time(compute, bandwidth) + self.hw.layer_overhead * work.num_layers

    def step_time(self, requests: Sequence[tuple[int, int]], num_sms: int) -> float:
        """Predicted seconds for one step over `requests` ((q new, c cached) each) on `num_sms` SMs."""
        return self.time(self.work(requests), num_sms)

    def decode_time(self, context_lens: Sequence[int], num_sms: int) -> float:
        """One decode step: each request adds one token after `context_lens[i]` cached ones."""
        return self.step_time([(1, c) for c in context_lens], num_sms)

    def _layer_ops(self, tokens: int) -> list[tuple[float, float]]:
        s, b, t = self.shape, self.shape.dtype_bytes, tokens
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        norm = _elementwise(b * (4 * t * s.hidden_size + s.hidden_size))  # read x, residual; write residual, out
        ops = [
            norm,
            _gemm(t, q_size + 2 * kv_size, s.hidden_size, b, bias=s.attention_bias),
            _elementwise(b * 2 * t * (q_size + kv_size)),  # rotary, in place on q and k
            _elementwise(b * 4 * t * kv_size),  # kv-cache store: read k, v; write both caches
            _gemm(t, s.hidden_size, q_size, b, bias=False),
            norm,
            _gemm(t, 2 * s.intermediate_size, s.hidden_size, b, bias=False),
            _elementwise(b * 3 * t * s.intermediate_size),  # silu_and_mul
            _gemm(t, s.hidden_size, s.intermediate_size, b, bias=False),
        ]
        if s.qk_norm:
            ops.append(_elementwise(b * (2 * t * (q_size + kv_size) + 2 * s.head_dim)))
        return ops

    def _attention_flops(self, q: int, c: int) -> float:
        return 4 * self.shape.num_heads * self.shape.head_dim * (q * c + q * (q + 1) / 2)

    def _attention_bytes(self, q: int, c: int) -> float:
        s = self.shape
        return s.dtype_bytes * s.head_dim * (2 * q * s.num_heads + 2 * (q + c) * s.num_kv_heads)


def _gemm(m: int, n: int, k: int, dtype_bytes: int, *, bias: bool) -> tuple[float, float]:
    """x[m, k] @ w[n, k].T: weights, activations in and out (and the bias) each cross HBM once."""
    return 2.0 * m * n * k, float(dtype_bytes * (n * k + m * k + m * n + (n if bias else 0)))


def _elementwise(nbytes: float) -> tuple[float, float]:
    return 0.0, float(nbytes)

