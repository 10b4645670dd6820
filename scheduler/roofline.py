"""Attention-aware roofline latency model: predicts how long one forward step over a batch of (new, cached) token counts
takes on a given SM budget, from operator FLOP and byte counts and the hardware profile."""
import bisect
import math
from itertools import accumulate
from collections.abc import Sequence
from dataclasses import dataclass, field

from minidu.scheduler.hardware import HardwareProfile


@dataclass(slots=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that its step latency depends on (built from the model config),
    and the tensor-parallel ranks it is split over.

    Under tensor parallelism (Megatron-style, as vLLM shards) each rank holds num_heads / N query heads, num_kv_heads / N
    kv heads (one replicated kv head when there are fewer kv heads than ranks), intermediate_size / N of the MLP and
    ceil(vocab_size / N) rows of the LM head; norms and the hidden size are whole on every rank.
    """

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
    tensor_parallel_size: int = field(default=1, kw_only=True)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                     "vocab_size", "dtype_bytes", "tensor_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        n = self.tensor_parallel_size
        for name in ("num_heads", "intermediate_size"):
            if getattr(self, name) % n:
                raise ValueError(f"tensor_parallel_size={n} must divide {name} ({getattr(self, name)})")
        kv = self.num_kv_heads
        if (kv % n if kv >= n else n % kv):
            raise ValueError(f"tensor_parallel_size={n} must divide num_kv_heads ({kv}) or be a multiple of it "
                             f"(kv heads are split across ranks, or replicated when fewer than ranks)")

    @property
    def rank_heads(self) -> int:
        return self.num_heads // self.tensor_parallel_size

    @property
    def rank_kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.tensor_parallel_size)

    @property
    def rank_intermediate_size(self) -> int:
        return self.intermediate_size // self.tensor_parallel_size

    @property
    def rank_vocab_size(self) -> int:
        return -(-self.vocab_size // self.tensor_parallel_size)  # the last shard is padded


@dataclass(frozen=True, slots=True)
class StepWork:
    """The (FLOPs, bytes) of every operator of one step: the GEMMs apart (their time depends on the budget through
    wave quantisation and on their row count through efficiency), the rest sorted by arithmetic intensity.

    Each other operator takes max(FLOPs / compute, bytes / bandwidth); an operator is compute-bound exactly when its
    intensity FLOPs/bytes is at least the ridge compute/bandwidth, so with the operators sorted by intensity the sum
    over all of them is one binary search plus two prefix sums, whatever the SM budget.
    """

    intensities: tuple[float, ...]  # ascending FLOP/byte
    flops_from: tuple[float, ...]  # flops_from[i]: FLOPs of operators i and later
    bytes_before: tuple[float, ...]  # bytes_before[i]: bytes of operators before i
    num_layers: int  # layers whose fixed overhead the step pays (0 for an empty step)
    gemms: tuple[tuple[int, int, float, float], ...] = ()  # (rows m, columns n, FLOPs, bytes) over all layers
    total_bytes: float = 0.0  # HBM traffic of the whole step, for bandwidth sharing
    collective_time: float = 0.0  # seconds of the tensor-parallel collectives, whatever the SM budget

    @classmethod
    def from_ops(cls, ops: list[tuple[float, float]], num_layers: int,
                 gemms: list[tuple[int, int, float, float]] = (), collective_time: float = 0.0) -> "StepWork":
        ops = sorted(ops, key=lambda op: op[0] / op[1])
        flops_from = (*reversed(list(accumulate((f for f, _ in reversed(ops)), initial=0.0))),)
        bytes_before = (*accumulate((b for _, b in ops), initial=0.0),)
        total = bytes_before[-1] + sum(g[3] for g in gemms)
        return cls(tuple(f / b for f, b in ops), flops_from, bytes_before, num_layers, tuple(gemms), total,
                   collective_time)

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

    Under tensor parallelism every operator above is one rank's share (ModelShape's rank_* sizes; all ranks run the
    same plan at once, so a step takes one rank's time), plus the collectives that join the ranks, in series with the
    layer they follow on the same SM partition and stream: an all-reduce of the T x H activations after the
    vocabulary-sharded embedding and after each layer's o and down projections, and an all-gather of the B sampled
    rows' logits. Their time depends on the interconnect, not the SM budget or HBM sharing.

    GEMMs are quantised into waves: ceil(m/tile) * ceil(n/tile) tiles on S programs run in ceil(tiles/S) waves, so
    their compute rate is compute(S) * gemm_efficiency(m) * tiles / (waves * S), and a GEMM with fewer tiles than S
    loads through only `tiles` programs. Two partitions running at once (`multiplexed_times`) share the device's
    HBM bandwidth and slow decode by the profile's co-run factor; a multiplexed period pays `period_overhead`.
    """

    def __init__(self, shape: ModelShape, hw: HardwareProfile):
        if shape.tensor_parallel_size > 1 and not hw.interconnect_bandwidth:
            raise ValueError(f"tensor_parallel_size={shape.tensor_parallel_size} needs the interconnect_bandwidth of "
                             f"hardware {hw.name!r}, which is unknown")
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
        gemms = [(m, n, f * layers, nbytes * layers) for m, n, f, nbytes in self._layer_gemms(tokens)]
        vocab = s.rank_vocab_size
        gemms.append((len(requests), vocab, *_gemm(len(requests), vocab, s.hidden_size, b, bias=False)))
        return StepWork.from_ops(ops, layers, gemms, self._collective_time(tokens, len(requests)))

    def time(self, work: StepWork, num_sms: int, bandwidth_share: float = 1.0) -> float:
        """Predicted seconds for `work` on `num_sms` SMs, with `bandwidth_share` of their HBM bandwidth."""
        if not work.num_layers:
            return 0.0
        hw = self.hw
        compute, bandwidth = hw.compute(num_sms), hw.bandwidth(num_sms) * bandwidth_share
        t = work.roofline_time(compute, bandwidth) + hw.layer_overhead * work.num_layers + work.collective_time
        for m, n, flops, nbytes in work.gemms:
            tiles = math.ceil(m / hw.gemm_tile) * math.ceil(n / hw.gemm_tile)
            waves = math.ceil(tiles / num_sms)
            rate = compute * hw.gemm_efficiency(m) * tiles / (waves * num_sms)
            loaders = bandwidth if tiles >= num_sms else hw.bandwidth(tiles) * bandwidth_share
            t += max(flops / rate, nbytes / loaders)
        return t

    def multiplexed_times(self, prefill: StepWork, num_sms_prefill: int, decode: StepWork,
                          num_sms_decode: int) -> tuple[float, float]:
        """(prefill step, one decode step) seconds when they run side by side. Their combined HBM demand (bytes over
        time, each alone) cannot exceed mem_bandwidth: above it both partitions' bandwidth is scaled down by the same
        factor. Decode then runs corun_decode_slowdown slower. Either part may be empty (0 seconds, no contention)."""
        t_p, t_d = self.time(prefill, num_sms_prefill), self.time(decode, num_sms_decode)
        if not (t_p and t_d):
            return t_p, t_d
        demand = prefill.total_bytes / t_p + decode.total_bytes / t_d
        if demand > self.hw.mem_bandwidth:
            share = self.hw.mem_bandwidth / demand
            t_p, t_d = self.time(prefill, num_sms_prefill, share), self.time(decode, num_sms_decode, share)
        return t_p, t_d * (1 + self.hw.corun_decode_slowdown)

    def period_time(self, k: int, t_d: float, t_p: float) -> float:
        """Seconds of a multiplexed period: k decode steps beside one prefill step, plus the multiplexing overhead."""
        return max(k * t_d, t_p) + (self.hw.period_overhead if t_d and t_p else 0.0)

    def step_time(self, requests: Sequence[tuple[int, int]], num_sms: int) -> float:
        """Predicted seconds for one step over `requests` ((q new, c cached) each) on `num_sms` SMs."""
        return self.time(self.work(requests), num_sms)

    def decode_time(self, context_lens: Sequence[int], num_sms: int) -> float:
        """One decode step: each request adds one token after `context_lens[i]` cached ones."""
        return self.step_time([(1, c) for c in context_lens], num_sms)

    def _collective_time(self, tokens: int, num_seqs: int) -> float:
        s, ranks = self.shape, self.shape.tensor_parallel_size
        if ranks == 1:
            return 0.0
        activations = tokens * s.hidden_size * s.dtype_bytes
        logits = num_seqs * s.rank_vocab_size * ranks * s.dtype_bytes
        return ((1 + 2 * s.num_layers) * self.hw.all_reduce_time(activations, ranks)
                + self.hw.all_gather_time(logits, ranks))

    def _layer_ops(self, tokens: int) -> list[tuple[float, float]]:
        s, b, t = self.shape, self.shape.dtype_bytes, tokens
        q_size, kv_size = s.rank_heads * s.head_dim, s.rank_kv_heads * s.head_dim
        norm = _elementwise(b * (4 * t * s.hidden_size + s.hidden_size))  # read x, residual; write residual, out
        ops = [
            norm,
            _elementwise(b * 2 * t * (q_size + kv_size)),  # rotary, in place on q and k
            _elementwise(b * 4 * t * kv_size),  # kv-cache store: read k, v; write both caches
            norm,
            _elementwise(b * 3 * t * s.rank_intermediate_size),  # silu_and_mul
        ]
        if s.qk_norm:
            ops.append(_elementwise(b * (2 * t * (q_size + kv_size) + 2 * s.head_dim)))
        return ops

    def _layer_gemms(self, tokens: int) -> list[tuple[int, int, float, float]]:
        """(m, n, FLOPs, bytes) of one layer's qkv, o, gate_up and down projections over `tokens` rows."""
        s, b, t = self.shape, self.shape.dtype_bytes, tokens
        q_size, kv_size, inter = s.rank_heads * s.head_dim, s.rank_kv_heads * s.head_dim, s.rank_intermediate_size
        shapes = [(q_size + 2 * kv_size, s.hidden_size, s.attention_bias), (s.hidden_size, q_size, False),
                  (2 * inter, s.hidden_size, False), (s.hidden_size, inter, False)]
        return [(t, n, *_gemm(t, n, k, b, bias=bias)) for n, k, bias in shapes]

    def _attention_flops(self, q: int, c: int) -> float:
        return 4 * self.shape.rank_heads * self.shape.head_dim * (q * c + q * (q + 1) / 2)

    def _attention_bytes(self, q: int, c: int) -> float:
        s = self.shape
        return s.dtype_bytes * s.head_dim * (2 * q * s.rank_heads + 2 * (q + c) * s.rank_kv_heads)


def _gemm(m: int, n: int, k: int, dtype_bytes: int, *, bias: bool) -> tuple[float, float]:
    """x[m, k] @ w[n, k].T: weights, activations in and out (and the bias) each cross HBM once."""
    return 2.0 * m * n * k, float(dtype_bytes * (n * k + m * k + m * n + (n if bias else 0)))


def _elementwise(nbytes: float) -> tuple[float, float]:
    return 0.0, float(nbytes)

