"""Times every minidu kernel family at Llama-3-8B-sized shapes and SM budgets against its roofline floor and PyTorch,
plus a spatial-isolation test (decode attention beside a GEMM on the other SMs). On a CPU it runs an interpreter
smoke test instead.

    python scripts/bench_kernels.py --budgets 8,16,32,64,96,132 --out benchmarks/results/kernels.json
"""
from minidu.kernels.platform import INTERPRET  # noqa: I001  (must run before triton is imported)

import argparse
import datetime
import itertools
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

from minidu.kernels.activation import silu_and_mul
from minidu.kernels.decode_attention import decode_attention
from minidu.kernels.gather import gather_rows
from minidu.kernels.gemm import gemm
from minidu.kernels.kv_cache import store_kvcache
from minidu.kernels.prefill_attention import prefill_attention
from minidu.kernels.rmsnorm import rms_norm
from minidu.kernels.rotary import rope_inv_freq, rotary_embedding
from minidu.kernels.sampling import sample

# (name, K, N) of each linear layer; M is the number of tokens in the batch.
PROJECTIONS = {
    "llama3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    "qwen3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 24576), ("down", 12288, 4096)],
}
GEMM_TOKENS = (1, 16, 64, 256, 2048, 8192)
DECODE_BATCHES = (1, 16, 64, 256)
DECODE_CONTEXTS = (512, 4096, 32768)
PREFILL_TOKENS = (1024, 2048, 4096, 8192)
LLAMA_HEADS = (32, 8, 128)  # query heads, kv heads, head_dim
BLOCK_SIZE = 16
VOCAB = 128256
HIDDEN = 4096
INTERMEDIATE = 14336
# Decode attention caches above this many tokens (B x context) are skipped: 4M tokens is 16 GiB of bf16 K/V.
MAX_DECODE_TOKENS = 1 << 22
# (rtol, atol) of the pre-timing correctness checks against fp32 references.
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


@dataclass(slots=True)
class Case:
    family: str
    shape: str
    flops: float
    bytes: float
    make: Callable[[], dict]  # one fresh set of random inputs (never zeros) and output buffers
    run: Callable[[dict, int | None], object]  # the kernel on one set under an SM budget
    check: Callable[[dict], None]  # raises AssertionError when the kernel disagrees with a torch reference
    torch_run: Callable[[dict], object] | None = None


@dataclass(slots=True)
class Row:
    family: str
    shape: str
    num_sms: int
    ms: float
    floor_ms: float
    fraction: float
    torch_ms: float | None
    vs_torch: float | None  # ms / torch_ms: below 1 is faster than PyTorch


def rand(shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=device) * scale).to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def gemm_case(name: str, m: int, k: int, n: int, dtype, device) -> Case:
    def make():
        return dict(x=rand((m, k), dtype, device), w=rand((n, k), dtype, device, k ** -0.5),
                    out=torch.empty(m, n, dtype=dtype, device=device))

    def check(a):
        assert_close(gemm(a["x"], a["w"]), a["x"].float() @ a["w"].float().T, "gemm", dtype)

    return Case("gemm", f"{name} M={m} {k}->{n}", 2 * m * n * k, (m * k + n * k + m * n) * dtype.itemsize, make,
                lambda a, s: gemm(a["x"], a["w"], num_sms=s, out=a["out"]), check,
                lambda a: torch.matmul(a["x"], a["w"].T, out=a["out"]))


def paged_kv(num_seqs: int, seq_len: int, heads, dtype, device):
    """Random K/V caches whose blocks are scattered over the pool, as after many allocations."""
    _, kv_heads, head_dim = heads
    blocks = triton.cdiv(seq_len, BLOCK_SIZE)
    shape = (num_seqs * blocks, BLOCK_SIZE, kv_heads, head_dim)
    tables = torch.randperm(num_seqs * blocks, device=device).view(num_seqs, blocks).to(torch.int32)
    return rand(shape, dtype, device), rand(shape, dtype, device), tables


def gather_kv(cache: torch.Tensor, table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    return cache[table_row.long()].flatten(0, 1)[:seq_len]


def ref_attention(q, k, v, q_pos, scale: float) -> torch.Tensor:
    """fp32 causal GQA attention: q [Tq, Hq, D] at positions q_pos over k, v [L, Hk, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    hidden = torch.arange(k.shape[0], device=q.device)[None, :] > q_pos[:, None]
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(hidden, -math.inf).softmax(-1), v)


def decode_case(batch: int, context: int, heads, dtype, device) -> Case:
    q_heads, kv_heads, head_dim = heads
    scale = head_dim ** -0.5

    def make():
        k_cache, v_cache, tables = paged_kv(batch, context, heads, dtype, device)
        return dict(q=rand((batch, q_heads, head_dim), dtype, device), k=k_cache, v=v_cache, tables=tables,
                    lens=torch.full((batch,), context, dtype=torch.int32, device=device),
                    out=torch.empty(batch, q_heads, head_dim, dtype=dtype, device=device))

    def run(a, s):
        return decode_attention(a["q"], a["k"], a["v"], a["lens"], a["tables"], scale=scale, num_sms=s, out=a["out"])

    def check(a):
        out = run(a, None)
        pos = torch.tensor([context - 1], device=device)
        for b in range(min(batch, 3)):
            k, v = (gather_kv(a[c], a["tables"][b], context) for c in ("k", "v"))
            assert_close(out[b], ref_attention(a["q"][b:b + 1], k, v, pos, scale)[0], "decode_attention", dtype)

    kv_bytes = 2 * batch * context * kv_heads * head_dim * dtype.itemsize
    return Case("decode_attn", f"B={batch} ctx={context}", 4 * batch * q_heads * context * head_dim,
                kv_bytes + 2 * batch * q_heads * head_dim * dtype.itemsize, make, run, check)


def prefill_case(tokens: int, heads, dtype, device) -> Case:
    q_heads, kv_heads, head_dim = heads
    scale = head_dim ** -0.5

    def make():
        k_cache, v_cache, tables = paged_kv(1, tokens, heads, dtype, device)
        q = rand((tokens, q_heads, head_dim), dtype, device)
        dense = [t.transpose(0, 1).unsqueeze(0).contiguous() for t in
                 (q, gather_kv(k_cache, tables[0], tokens), gather_kv(v_cache, tables[0], tokens))]
        return dict(q=q, k=k_cache, v=v_cache, tables=tables, dense=dense, out=torch.empty_like(q),
                    cu=torch.tensor([0, tokens], dtype=torch.int32, device=device),
                    lens=torch.tensor([tokens], dtype=torch.int32, device=device))

    def run(a, s):
        return prefill_attention(a["q"], a["k"], a["v"], a["cu"], a["lens"], a["tables"], scale=scale, num_sms=s,
                                 out=a["out"])

    def check(a):
        out, rows = run(a, None), torch.tensor(sorted({0, 1, tokens // 2, tokens - 2, tokens - 1}), device=device)
        k, v = (gather_kv(a[c], a["tables"][0], tokens) for c in ("k", "v"))
        assert_close(out[rows], ref_attention(a["q"][rows], k, v, rows, scale), "prefill_attention", dtype)

    def torch_run(a):
        return F.scaled_dot_product_attention(*a["dense"], is_causal=True, scale=scale, enable_gqa=True)

    io_bytes = tokens * (2 * q_heads + 2 * kv_heads) * head_dim * dtype.itemsize
    return Case("prefill_attn", f"T={tokens}", 2 * q_heads * head_dim * tokens * (tokens + 1), io_bytes, make, run,
                check, torch_run)


def rmsnorm_case(tokens: int, hidden: int, dtype, device) -> Case:
    eps = 1e-5

    def make():
        return dict(x=rand((tokens, hidden), dtype, device), res=rand((tokens, hidden), dtype, device),
                    w=rand((hidden,), dtype, device), out=torch.empty(tokens, hidden, dtype=dtype, device=device))

    def check(a):
        summed = (a["x"].float() + a["res"].float()).to(dtype)
        out, res = rms_norm(a["x"], a["w"], eps, residual=a["res"])
        assert_close(res, summed, "rms_norm residual", dtype)
        assert_close(out, F.rms_norm(summed.float(), (hidden,), a["w"].float(), eps), "rms_norm", dtype)

    return Case("rmsnorm", f"T={tokens} H={hidden} +residual", 4 * tokens * hidden,
                (4 * tokens * hidden + hidden) * dtype.itemsize, make,
                lambda a, s: rms_norm(a["x"], a["w"], eps, residual=a["res"], num_sms=s, out=a["out"]), check,
                lambda a: F.rms_norm(a["x"] + a["res"], (hidden,), a["w"], eps))


def silu_case(tokens: int, inter: int, dtype, device) -> Case:
    def make():
        return dict(x=rand((tokens, 2 * inter), dtype, device),
                    out=torch.empty(tokens, inter, dtype=dtype, device=device))

    def check(a):
        gate, up = a["x"].float().chunk(2, dim=-1)
        assert_close(silu_and_mul(a["x"]), F.silu(gate) * up, "silu_and_mul", dtype)

    return Case("silu_and_mul", f"T={tokens} I={inter}", 5 * tokens * inter, 3 * tokens * inter * dtype.itemsize,
                make, lambda a, s: silu_and_mul(a["x"], num_sms=s, out=a["out"]), check,
                lambda a: F.silu(a["x"][:, :inter]) * a["x"][:, inter:])


def ref_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    angles = positions.double()[:, None, None] * inv_freq.double()[None, None, :]
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()], dim=-1)


def rotary_case(tokens: int, heads, dtype, device) -> Case:
    q_heads, kv_heads, head_dim = heads
    inv_freq = rope_inv_freq(head_dim, 500000.0).to(device)

    def make():
        qkv = rand((tokens, (q_heads + 2 * kv_heads) * head_dim), dtype, device)
        q = qkv[:, :q_heads * head_dim].view(tokens, q_heads, head_dim)
        k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
        return dict(q=q, k=k, pos=torch.randint(0, 4096, (tokens,), device=device))

    def check(a):
        q0, k0 = a["q"].clone(), a["k"].clone()
        rotary_embedding(a["q"], a["k"], a["pos"], inv_freq)
        assert_close(a["q"], ref_rotary(q0, a["pos"], inv_freq), "rotary q", dtype)
        assert_close(a["k"], ref_rotary(k0, a["pos"], inv_freq), "rotary k", dtype)

    return Case("rotary", f"T={tokens} q{q_heads}/k{kv_heads}x{head_dim}", 6 * tokens * (q_heads + kv_heads) * head_dim,
                2 * tokens * (q_heads + kv_heads) * head_dim * dtype.itemsize, make,
                lambda a, s: rotary_embedding(a["q"], a["k"], a["pos"], inv_freq, num_sms=s), check)


def store_case(tokens: int, heads, dtype, device) -> Case:
    _, kv_heads, head_dim = heads

    def make():
        k_cache, v_cache, _ = paged_kv(2, tokens, heads, dtype, device)
        slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device=device)[:tokens]
        k, v = (rand((tokens, kv_heads, head_dim), dtype, device) for _ in range(2))
        return dict(k=k, v=v, kc=k_cache, vc=v_cache, slots=slots)

    def check(a):
        store_kvcache(a["k"], a["v"], a["kc"], a["vc"], a["slots"])
        for name, cache in (("k", "kc"), ("v", "vc")):
            assert torch.equal(a[cache].flatten(0, 1)[a["slots"]], a[name]), f"store_kvcache {name}"

    def torch_run(a):
        a["kc"].view(-1, kv_heads, head_dim).index_copy_(0, a["slots"], a["k"])
        a["vc"].view(-1, kv_heads, head_dim).index_copy_(0, a["slots"], a["v"])

    return Case("store_kvcache", f"T={tokens} k{kv_heads}x{head_dim}", 0,
                4 * tokens * kv_heads * head_dim * dtype.itemsize, make,
                lambda a, s: store_kvcache(a["k"], a["v"], a["kc"], a["vc"], a["slots"], num_sms=s), check, torch_run)


def embedding_case(tokens: int, vocab: int, hidden: int, dtype, device) -> Case:
    def make():
        return dict(ids=torch.randint(0, vocab, (tokens,), device=device), w=rand((vocab, hidden), dtype, device),
                    out=torch.empty(tokens, hidden, dtype=dtype, device=device))

    def check(a):
        assert torch.equal(gather_rows(a["ids"], a["w"]), a["w"][a["ids"]]), "gather_rows"

    return Case("gather_rows", f"T={tokens} V={vocab} H={hidden}", 0, 2 * tokens * hidden * dtype.itemsize, make,
                lambda a, s: gather_rows(a["ids"], a["w"], num_sms=s, out=a["out"]), check,
                lambda a: F.embedding(a["ids"], a["w"]))


def sampling_case(batch: int, vocab: int, dtype, device) -> Case:
    def make():
        full = dict(dtype=torch.float32, device=device)
        return dict(logits=rand((batch, vocab), dtype, device, 3.0), temps=torch.full((batch,), 0.7, **full),
                    top_ks=torch.full((batch,), 50, dtype=torch.int32, device=device),
                    top_ps=torch.full((batch,), 0.9, **full), seeds=torch.arange(batch, device=device),
                    steps=torch.zeros(batch, dtype=torch.int64, device=device))

    def run(a, s, temps=None):
        temps = a["temps"] if temps is None else temps
        return sample(a["logits"], temps, a["top_ks"], a["top_ps"], a["seeds"], a["steps"], num_sms=s)

    def check(a):
        greedy = run(a, None, torch.zeros_like(a["temps"]))
        assert torch.equal(greedy, a["logits"].float().argmax(-1)), "sample (greedy)"

    return Case("sampling", f"B={batch} V={vocab} top-k/p", 10 * batch * vocab, batch * vocab * dtype.itemsize, make,
                run, check)


def gemm_cases(models: list[str], dtype, device) -> list[Case]:
    return [gemm_case(f"{model}.{name}", m, k, n, dtype, device)
            for model in models for name, k, n in PROJECTIONS[model] for m in GEMM_TOKENS]


def attention_cases(families: set[str], dtype, device) -> list[Case]:
    cases = []
    if "decode" in families:
        cases += [decode_case(b, c, LLAMA_HEADS, dtype, device) for b in DECODE_BATCHES for c in DECODE_CONTEXTS
                  if b * c <= MAX_DECODE_TOKENS]
    if "prefill" in families:
        cases += [prefill_case(t, LLAMA_HEADS, dtype, device) for t in PREFILL_TOKENS]
    return cases


def misc_cases(dtype, device) -> list[Case]:
    return ([rmsnorm_case(t, HIDDEN, dtype, device) for t in (1, 256, 8192)]
            + [silu_case(t, INTERMEDIATE, dtype, device) for t in (1, 256, 8192)]
            + [rotary_case(t, LLAMA_HEADS, dtype, device) for t in (1, 256, 8192)]
            + [store_case(t, LLAMA_HEADS, dtype, device) for t in (1, 256, 8192)]
            + [embedding_case(t, VOCAB, HIDDEN, dtype, device) for t in (1, 256, 8192)]
            + [sampling_case(b, VOCAB, dtype, device) for b in (1, 64, 256)])


def time_ms(run: Callable[[dict], object], arg_sets: list[dict], use_graph: bool) -> float:
    """Median ms of one call, rotating over arg_sets so L2 never holds a call's inputs from the previous one.

    With use_graph, one CUDA graph holds one call per set, so Python launch overhead is not timed.
    """
    for a in arg_sets:
        run(a)
    torch.cuda.synchronize()
    if not use_graph:
        cycle = itertools.cycle(arg_sets)
        return triton.testing.do_bench(lambda: run(next(cycle)), return_mode="median")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for a in arg_sets:
            run(a)
    return triton.testing.do_bench(graph.replay, return_mode="median") / len(arg_sets)


def rotation(set_bytes: int) -> int:
    """Input sets to rotate through: enough to overflow L2 twice, within a 4 GiB budget."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(8, math.ceil(2 * l2 / max(set_bytes, 1)), (4 << 30) // max(set_bytes, 1)))


def set_size(args: dict) -> int:
    tensors = [t for v in args.values() for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_case(case: Case, budgets: list[int], opts) -> list[Row]:
    first = case.make()
    case.check(first)
    arg_sets = [first] + [case.make() for _ in range(rotation(set_size(first)) - 1)]
    floor_ms = 1e3 * max(case.flops / opts.peak_flops, case.bytes / opts.bandwidth)
    torch_ms = time_ms(case.torch_run, arg_sets, opts.graph) if case.torch_run else None
    rows = []
    for s in budgets:
        ms = time_ms(lambda a, s=s: case.run(a, s), arg_sets, opts.graph)
        rows.append(Row(case.family, case.shape, s, ms, floor_ms, floor_ms / ms, torch_ms,
                        ms / torch_ms if torch_ms else None))
        print_row(rows[-1])
    del arg_sets, first
    torch.cuda.empty_cache()
    return rows


def print_row(r: Row) -> None:
    torch_part = f"{r.torch_ms * 1e3:10.1f} {r.vs_torch:7.2f}x" if r.torch_ms else f"{'-':>10} {'-':>8}"
    print(f"{r.family:14} {r.shape:34} {r.num_sms:4} {r.ms * 1e3:10.1f} {r.floor_ms * 1e3:10.1f} {r.fraction:6.1%} "
          f"{torch_part}", flush=True)


def concurrent_decode_ms(decode: Callable[[], object], other: Callable[[], object], reps: int) -> float:
    """ms per decode call while `other` runs on a second stream (other must outlast the decode calls)."""
    decode_stream, other_stream = torch.cuda.Stream(), torch.cuda.Stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    with torch.cuda.stream(other_stream):
        other()
    with torch.cuda.stream(decode_stream):
        torch.cuda._sleep(1_000_000)  # lets the GEMM's programs occupy their SMs first
        start.record()
        for _ in range(reps):
            decode()
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def isolation(opts, total_sms: int) -> list[dict]:
    """Decode attention on S_d SMs beside a prefill-sized GEMM on the remaining SMs, against the decode alone."""
    dec = decode_case(64, 4096, LLAMA_HEADS, opts.dtype, "cuda")
    mm = gemm_case("llama3-8b.gate_up", 8192, HIDDEN, 2 * INTERMEDIATE, opts.dtype, "cuda")
    dec_args, mm_args = dec.make(), mm.make()
    results = []
    for s_d in (16, 32, 64):
        alone = time_ms(lambda a: dec.run(a, s_d), [dec_args], use_graph=False)
        gemm_ms = time_ms(lambda a: mm.run(a, total_sms - s_d), [mm_args], use_graph=False)
        reps = 50
        gemm_reps = max(1, math.ceil(3 * reps * alone / gemm_ms))
        samples = [concurrent_decode_ms(lambda: dec.run(dec_args, s_d),
                                        lambda: [mm.run(mm_args, total_sms - s_d) for _ in range(gemm_reps)], reps)
                   for _ in range(5)]
        shared = statistics.median(samples)
        results.append(dict(decode_sms=s_d, gemm_sms=total_sms - s_d, decode=dec.shape, gemm=mm.shape,
                            decode_alone_ms=alone, decode_with_gemm_ms=shared, slowdown=shared / alone))
        print(f"S_d={s_d:3}  decode alone {alone * 1e3:8.1f} us  beside GEMM on {total_sms - s_d} SMs "
              f"{shared * 1e3:8.1f} us  slowdown {shared / alone:5.2f}x", flush=True)
    return results


def smoke() -> None:
    """One tiny interpreted call of each kernel, checked against torch."""
    heads, dtype, device = (4, 2, 16), torch.float32, torch.device("cpu")
    cases = [gemm_case("tiny", 3, 24, 40, dtype, device), decode_case(2, 37, heads, dtype, device),
             prefill_case(21, heads, dtype, device), rmsnorm_case(3, 64, dtype, device),
             silu_case(3, 48, dtype, device),
             rotary_case(3, heads, dtype, device), store_case(5, heads, dtype, device),
             embedding_case(4, 100, 64, dtype, device), sampling_case(2, 300, dtype, device)]
    for case in cases:
        case.check(case.make())
        print(f"ok  {case.family:14} {case.shape}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="8,16,32,64,96,132",
                        help="comma-separated SM budgets (capped at the GPU's)")
    parser.add_argument("--families", default="gemm,decode,prefill,misc,isolation",
                        help="subset of gemm,decode,prefill,misc,isolation")
    parser.add_argument("--models", default="llama3-8b", help=f"GEMM shape sets, from {sorted(PROJECTIONS)}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--peak-flops", type=float, default=790e12, help="dense FLOP/s for the roofline floor")
    parser.add_argument("--bandwidth", type=float, default=4.3e12, help="HBM bytes/s for the roofline floor")
    parser.add_argument("--no-graph", dest="graph", action="store_false", help="time eager launches, not CUDA graphs")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/kernels-<date>.json)")
    opts = parser.parse_args(argv)
    opts.dtype = getattr(torch, opts.dtype)
    opts.families = set(opts.families.split(","))
    opts.models = opts.models.split(",")
    if unknown := opts.families - {"gemm", "decode", "prefill", "misc", "isolation"}:
        parser.error(f"--families: unknown {sorted(unknown)}")
    if unknown := set(opts.models) - set(PROJECTIONS):
        parser.error(f"--models: unknown {sorted(unknown)}")
    try:
        opts.budgets = sorted({int(b) for b in opts.budgets.split(",")})
    except ValueError:
        parser.error(f"--budgets must be comma-separated ints, got {opts.budgets!r}")
    if opts.budgets[0] < 1:
        parser.error("--budgets must be >= 1")
    return opts


def run_all(opts) -> dict:
    total_sms = torch.cuda.get_device_properties(0).multi_processor_count
    budgets = [b for b in opts.budgets if b <= total_sms] or [total_sms]
    cases = gemm_cases(opts.models, opts.dtype, "cuda") if "gemm" in opts.families else []
    cases += attention_cases(opts.families, opts.dtype, "cuda")
    cases += misc_cases(opts.dtype, "cuda") if "misc" in opts.families else []
    print(f"{'family':14} {'shape':34} {'sms':>4} {'us':>10} {'floor us':>10} {'frac':>6} {'torch us':>10} "
          f"{'vs torch':>8}")
    rows = [asdict(r) for case in cases for r in bench_case(case, budgets, opts)]
    iso = isolation(opts, total_sms) if "isolation" in opts.families else []
    return dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(0), num_sms=total_sms,
                triton=triton.__version__, torch=torch.__version__, dtype=str(opts.dtype), peak_flops=opts.peak_flops,
                bandwidth=opts.bandwidth, cuda_graphs=opts.graph, rows=rows, isolation=iso)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    torch.manual_seed(0)
    if INTERPRET or not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU; running a Triton-interpreter smoke test instead")
        smoke()
        return 0
    result = run_all(opts)
    out = opts.out or Path(__file__).resolve().parents[1] / f"benchmarks/results/kernels-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
