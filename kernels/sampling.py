"""Token sampling for a batch of requests (greedy, temperature, top-k, top-p) in one persistent Triton kernel.

Top-k and top-p become a threshold on the temperature-scaled logits, found by a 16-way search over order-preserving
integer keys of their fp32 values; the token then wins an exponential race (Gumbel-max) on Philox noise keyed by
(seed, step, vocab index), so a request's token depends only on its own logits row and parameters.
"""
import torch
import triton
import triton.language as tl

from minidu.kernels import tiles as tile_table
from minidu.kernels.utils import FLOAT_DTYPES, INTERPRET, check_tensor, next_power_of_2, num_programs

# A search step weighs NUM_PIVOTS candidate keys in one pass over the row; keys of fp32 values span fewer than 2**32
# integers, so 8 steps of 16 pivots (16**8 == 2**32) isolate a single key exactly.
_NUM_PIVOTS = 16
_SEARCH_STEPS = 8
# Padding key, below the key of every real value (-inf included), so padded columns are never kept.
_PAD_KEY = tl.constexpr(-(2**31))
# Above or equal to every real key: the start of a running minimum.
_MAX_KEY = tl.constexpr(2**31 - 1)


@triton.jit
def _load_scaled(
    logits_ptr,  # [B, V], strides (stride_b, 1)
    rows, row_mask, cols, stride_b, scale, V,
):
    """Scaled logits z = x / scale in fp32 for a [ROWS, chunk] block of columns, their int32 keys and the validity
    mask."""
    valid = row_mask[:, None] & (cols < V)[None, :]
    x = tl.load(logits_ptr + (rows * stride_b)[:, None] + cols[None, :], mask=valid, other=float("-inf"))
    z = x.to(tl.float32) / scale[:, None]
    # NaN logits must never be chosen: treat them as masked-out tokens.
    z = tl.where(z == z, z, float("-inf"))
    # Sign-magnitude bits -> two's complement gives keys ordered like the floats, with -0.0 and +0.0 on one key.
    bits = z.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    key = tl.where(bits < 0, -magnitude, magnitude)
    return z, tl.where(valid, key, _PAD_KEY), valid


@triton.jit
def _search_threshold(
    logits_ptr,  # [B, V], strides (stride_b, 1)
    rows, row_mask, stride_b, scale, V, zshift, target, lo, hi,
    BY_MASS: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    NUM_PIVOTS: tl.constexpr, NUM_STEPS: tl.constexpr,
):
    """Per row, the largest key t in [lo, hi] whose kept weight reaches target, where the kept weight counts the
    tokens with key >= t (or sums their exp(z - zshift) when BY_MASS). The caller guarantees that lo qualifies.

    Each step weighs evenly spaced pivots in [lo, hi] and narrows to the gap after the last one that qualifies. The
    weight only changes at keys present in the row, so the result is the key of a real token.
    """
    pivot_ids = tl.arange(0, NUM_PIVOTS).to(tl.int64)
    for _ in range(NUM_STEPS):
        spacing = (hi - lo) // NUM_PIVOTS + 1
        pivots = tl.minimum(lo[:, None] + pivot_ids[None, :] * spacing[:, None], hi[:, None])
        pivot_keys = pivots.to(tl.int32)[:, :, None]
        # Per-lane partial sums, reduced once after the row: no cross-warp reduction per chunk.
        acc = tl.zeros((ROWS, NUM_PIVOTS, BLOCK_V), dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z, key, valid = _load_scaled(logits_ptr, rows, row_mask, cols, stride_b, scale, V)
            if BY_MASS:
                weight = tl.exp(z - zshift[:, None])
            else:
                weight = tl.full((ROWS, BLOCK_V), 1.0, dtype=tl.float32)
            acc += tl.where(key[:, None, :] >= pivot_keys, weight[:, None, :], 0.0)
        kept = tl.sum(acc, axis=2)
        # Pivots equal to lo qualify by contract, whatever the rounding of this sum says.
        ok = (kept >= target[:, None]) | (pivots == lo[:, None])
        lo = tl.max(tl.where(ok, pivots, lo[:, None]), axis=1)
        hi = tl.min(tl.where(ok, hi[:, None], pivots - 1), axis=1)
    return lo


@triton.jit
def _mass_above(
    logits_ptr,  # [B, V], strides (stride_b, 1)
    rows, row_mask, stride_b, scale, V, zshift, threshold,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row, the unnormalised softmax mass sum exp(z - zshift) of the tokens with key >= threshold."""
    acc = tl.zeros((ROWS, BLOCK_V), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z, key, valid = _load_scaled(logits_ptr, rows, row_mask, cols, stride_b, scale, V)
        acc += tl.where(key >= threshold[:, None], tl.exp(z - zshift[:, None]), 0.0)
    return tl.sum(acc, axis=1)


@triton.jit
def _first_argmax(lane_best, lane_index, V):
    """Row max of per-lane maxima [ROWS, SCAN_V] and the lowest vocab index reaching it.

    Each lane keeps its first maximum (strict updates over increasing columns), so the lowest index among the lanes
    that reach the row max is the row's first maximum.
    """
    best = tl.max(lane_best, axis=1)
    return best, tl.min(tl.where(lane_best == best[:, None], lane_index, V), axis=1).to(tl.int64)


@triton.jit
def _race(
    logits_ptr,  # [B, V], strides (stride_b, 1)
    rows, row_mask, stride_b, scale, V, threshold, seed, step, fallback,
    ROWS: tl.constexpr, SCAN_V: tl.constexpr,
):
    """argmax over kept tokens of z - log(E), E ~ Exp(1): an exact draw from softmax(z) restricted to the kept set."""
    lane_best = tl.full((ROWS, SCAN_V), float("-inf"), dtype=tl.float32)
    lane_token = tl.zeros((ROWS, SCAN_V), dtype=tl.int32)
    for start in range(0, V, SCAN_V):
        cols = start + tl.arange(0, SCAN_V)
        z, key, valid = _load_scaled(logits_ptr, rows, row_mask, cols, stride_b, scale, V)
        # Philox key = seed, counter = (vocab index, step mod 2**32): independent streams per request and per step.
        counter = (step << 32)[:, None] + cols.to(tl.int64)[None, :]
        u = tl.rand(seed[:, None], counter)
        score = tl.where(key >= threshold[:, None], z - tl.log(-tl.log(u)), float("-inf"))
        better = score > lane_best
        lane_best = tl.where(better, score, lane_best)
        lane_token = tl.where(better, cols[None, :], lane_token)
    best, token = _first_argmax(lane_best, lane_token, V)
    # Only when every kept token scored -inf (a row of -inf logits): nothing was drawn.
    return tl.where(best > float("-inf"), token, fallback)


@triton.jit
def _sample_kernel(
    logits_ptr,  # [B, V], strides (stride_b, 1)
    temperatures_ptr,  # [B] float32
    top_ks_ptr,  # [B] int32
    top_ps_ptr,  # [B] float32
    seeds_ptr,  # [B] int64
    steps_ptr,  # [B] int64
    out_ptr,  # [B] int64
    B, V, stride_b, num_tiles,
    NUM_PROGRAMS,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, SCAN_V: tl.constexpr, NUM_PIVOTS: tl.constexpr,
    NUM_STEPS: tl.constexpr,
):
    pid = tl.program_id(0)
    for tile in tl.range(pid, num_tiles, NUM_PROGRAMS):
        rows = tl.arange(0, ROWS).to(tl.int64) + tile * ROWS
        row_mask = rows < B
        temperature = tl.load(temperatures_ptr + rows, mask=row_mask, other=0.0)
        greedy = temperature == 0.0
        sampled = row_mask & (temperature > 0.0)
        scale = tl.where(sampled, temperature, 1.0)

        # Pass 1: row max with its lowest index (the greedy token) and the key range the searches start from.
        lane_max = tl.full((ROWS, SCAN_V), float("-inf"), dtype=tl.float32)
        lane_arg = tl.zeros((ROWS, SCAN_V), dtype=tl.int32)
        lane_kmin = tl.full((ROWS, SCAN_V), _MAX_KEY, dtype=tl.int32)
        lane_kmax = tl.full((ROWS, SCAN_V), _PAD_KEY, dtype=tl.int32)
        for start in range(0, V, SCAN_V):
            cols = start + tl.arange(0, SCAN_V)
            z, key, valid = _load_scaled(logits_ptr, rows, row_mask, cols, stride_b, scale, V)
            better = z > lane_max
            lane_max = tl.where(better, z, lane_max)
            lane_arg = tl.where(better, cols[None, :], lane_arg)
            lane_kmin = tl.minimum(lane_kmin, tl.where(valid, key, _MAX_KEY))
            lane_kmax = tl.maximum(lane_kmax, key)
        zmax, greedy_token = _first_argmax(lane_max, lane_arg, V)
        kmin = tl.min(lane_kmin, axis=1)
        kmax = tl.max(lane_kmax, axis=1)
        lo = tl.where(row_mask, kmin, 0).to(tl.int64)
        hi = tl.where(row_mask, kmax, 0).to(tl.int64)
        # A row of -inf has no mass; shifting by 0 keeps exp() free of NaN.
        zshift = tl.where(zmax > float("-inf"), zmax, 0.0)

        # Top-k: the k-th largest key. Rows without top-k ask for all V tokens and get kmin (keep everything).
        top_k = tl.load(top_ks_ptr + rows, mask=row_mask, other=0)
        k_on = sampled & (top_k > 0) & (top_k < V)
        threshold = lo
        if tl.max(k_on.to(tl.int32), axis=0) > 0:
            k_target = tl.where(k_on, top_k, V).to(tl.float32)
            threshold = _search_threshold(logits_ptr, rows, row_mask, stride_b, scale, V, zshift, k_target, lo, hi,
                                          False, ROWS, BLOCK_V, NUM_PIVOTS, NUM_STEPS)

        # Top-p on the top-k survivors: the highest threshold whose kept mass still reaches top_p of theirs.
        # Tokens tied at the threshold are all kept, as they are for top-k.
        top_p = tl.load(top_ps_ptr + rows, mask=row_mask, other=1.0)
        p_on = sampled & (top_p < 1.0)
        if tl.max(p_on.to(tl.int32), axis=0) > 0:
            mass_k = _mass_above(logits_ptr, rows, row_mask, stride_b, scale, V, zshift, threshold, ROWS, BLOCK_V)
            p_target = tl.where(p_on, top_p, 1.0) * mass_k
            p_threshold = _search_threshold(logits_ptr, rows, row_mask, stride_b, scale, V, zshift, p_target,
                                            threshold, hi, True, ROWS, BLOCK_V, NUM_PIVOTS, NUM_STEPS)
            threshold = tl.where(p_on, p_threshold, threshold)

        token = greedy_token
        if tl.max(sampled.to(tl.int32), axis=0) > 0:
            seed = tl.load(seeds_ptr + rows, mask=row_mask, other=0)
            step = tl.load(steps_ptr + rows, mask=row_mask, other=0)
            drawn = _race(logits_ptr, rows, row_mask, stride_b, scale, V, threshold, seed, step, greedy_token,
                          ROWS, SCAN_V)
            token = tl.where(greedy, greedy_token, drawn)
        tl.store(out_ptr + rows, token, mask=row_mask)


def _check_values(temperatures: torch.Tensor, top_ps: torch.Tensor) -> None:
    """Range checks that need the values, so only for CPU tensors (on CUDA they would force a device sync)."""
    bad = ~(torch.isfinite(temperatures) & (temperatures >= 0))
    if bool(bad.any()):
        raise ValueError(f"temperatures must be finite and >= 0, got {temperatures[bad][:4].tolist()}")
    bad = ~((top_ps > 0) & (top_ps <= 1))
    if bool(bad.any()):
        raise ValueError(f"top_ps must lie in (0, 1], got {top_ps[bad][:4].tolist()}")


def _tile_shape(vocab: int) -> tuple[int, int, int]:
    """(rows per tile, vocab chunk of the sums, vocab chunk of the maxima). Only V decides it, never B or num_sms, so a
    row is always reduced in one order."""
    if INTERPRET:
        # Interpreter cost is per op, not per element: many rows per tile, up to 64K elements in the
        # [rows, pivots, chunk] comparisons.
        block_v = min(next_power_of_2(vocab), 2048)
        rows = max(1, min(512, 65536 // (_NUM_PIVOTS * block_v)))
        return rows, block_v, min(next_power_of_2(vocab), max(block_v, tile_table.INTERPRET_SCAN_ELEMS // rows))
    # On CUDA one row per program streams the vocab in chunks small enough for the [pivots, chunk] comparisons.
    block_v = min(next_power_of_2(vocab), 512)
    return 1, block_v, block_v


def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor, *, num_sms: int | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of logits [B, V] -> int64 [B].

    Row b is greedy (lowest index among maxima) when temperatures[b] == 0; otherwise it is drawn from
    softmax(logits[b] / temperatures[b]) restricted to the top_ks[b] largest (<= 0 or >= V: off), then to the smallest
    highest-probability set reaching mass top_ps[b] (1.0: off), ties at either cut all kept. The draw is a pure
    function of (seeds[b], steps[b], logits[b]). NaN logits are never chosen. Rows may be strided; the last dim must
    be contiguous.
    """
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    batch, vocab = logits.shape
    if vocab < 1:
        raise ValueError(f"logits must have at least one vocabulary entry, got shape {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous in its last dimension, got strides {logits.stride()}")
    device = logits.device
    for name, t, dtype in (("temperatures", temperatures, torch.float32), ("top_ks", top_ks, torch.int32),
                           ("top_ps", top_ps, torch.float32), ("seeds", seeds, torch.int64),
                           ("steps", steps, torch.int64)):
        check_tensor(name, t, ndim=1, dtypes=(dtype,), device=device, shape=(batch,), contiguous=True)
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=device)
    else:
        check_tensor("out", out, ndim=1, dtypes=(torch.int64,), device=device, shape=(batch,), contiguous=True)
    if device.type == "cpu":
        _check_values(temperatures, top_ps)

    rows, block_v, scan_v = _tile_shape(vocab)
    num_tiles = triton.cdiv(batch, rows)
    grid = num_programs(num_tiles, num_sms, device)
    if batch == 0:
        return out
    _sample_kernel[(grid,)](
        logits, temperatures, top_ks, top_ps, seeds, steps, out,
        batch, vocab, logits.stride(0), num_tiles, grid,
        ROWS=rows, BLOCK_V=block_v, SCAN_V=scan_v, NUM_PIVOTS=_NUM_PIVOTS, NUM_STEPS=_SEARCH_STEPS, num_warps=8,
    )
    return out
