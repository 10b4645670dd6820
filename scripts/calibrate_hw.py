"""Measures the throughput of minidu's own GEMM (compute-bound) and decode attention (bandwidth-bound) at SM budgets
from a few SMs to the whole GPU, then the multiplexing physics: GEMM efficiency at mid-size row counts, decode
attention's slowdown beside a GEMM on the other SMs (two streams), and the overhead of one two-stream period; writes
the HardwareProfile JSON that the scheduler's latency model loads (marked calibrated).

    python scripts/calibrate_hw.py --out benchmarks/results/h200-profile.json
"""
import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import minidu  # noqa: F401  (chooses compiled vs interpreted Triton before triton is imported)
import torch

from minidu.scheduler.calibration import build_profile, fit_corun_slowdown, fit_gemm_efficiency
from minidu.scheduler.hardware import with_physics

# Smallest budget whose bandwidth reaches this fraction of the best one is reported as the saturation point.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/h200-profile.json"))
    parser.add_argument("--name", default=None, help="profile name (default: the GPU's name)")
    parser.add_argument("--step", type=int, default=4, help="SM budgets step..num_sms in steps of this")
    parser.add_argument("--gemm-shape", type=int, nargs=3, default=(8192, 4096, 4096), metavar=("M", "N", "K"))
    parser.add_argument("--batch", type=int, default=32, help="decode requests")
    parser.add_argument("--context", type=int, default=16384, help="cached tokens per decode request")
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--gemm-tokens", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096],
                        help="row counts of the GEMM efficiency curve")
    parser.add_argument("--decode-budgets", type=int, nargs="+", default=[16, 32, 48, 64],
                        help="decode SM budgets of the co-run isolation runs (prefill GEMM on the rest)")
    parser.add_argument("--layer-overhead", type=float, default=20e-6, help="seconds per layer per step (not measured)")
    args = parser.parse_args(argv)
    if args.step < 1:
        parser.error("--step must be >= 1")
    return args


def gemm_flops(budgets: list[int], m: int, n: int, k: int) -> dict[int, float]:
    """FLOP/s of an [m, k] x [n, k]^T bf16 GEMM at each SM budget (median of do_bench)."""
    from triton.testing import do_bench

    from minidu.kernels.gemm import gemm

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    table = {}
    for s in budgets:
        ms = do_bench(lambda: gemm(x, w, num_sms=s, out=out), return_mode="median")
        table[s] = 2.0 * m * n * k / (ms * 1e-3)
    return table


def decode_bandwidth(budgets: list[int], args: argparse.Namespace) -> dict[int, float]:
    """HBM bytes/s of bf16 decode attention over long paged contexts at each SM budget (median of do_bench)."""
    from triton.testing import do_bench

    from minidu.kernels.decode_attention import decode_attention

    q, k_cache, v_cache, seq_lens, block_tables, nbytes = decode_inputs(args)
    out = torch.empty_like(q)
    scale = args.head_dim ** -0.5
    table = {}
    for s in budgets:
        ms = do_bench(lambda: decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale=scale, num_sms=s,
                                               out=out), return_mode="median")
        table[s] = nbytes / (ms * 1e-3)
    return table


def gemm_seconds_by_tokens(tokens: list[int], n: int, k: int, num_sms: int) -> dict[int, float]:
    """Median seconds of an [m, k] x [n, k]^T bf16 GEMM on all SMs at each row count m."""
    from triton.testing import do_bench

    from minidu.kernels.gemm import gemm

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    table = {}
    for m in tokens:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        table[m] = do_bench(lambda: gemm(x, w, num_sms=num_sms), return_mode="median") * 1e-3
    return table


def corun_runs(args: argparse.Namespace, num_sms: int) -> list[tuple[float, float, float, float, float, float]]:
    """For each decode budget S_d: decode attention on S_d SMs and a prefill-sized GEMM on num_sms - S_d SMs, each
    alone and then side by side on two streams: (decode bytes, seconds alone, beside; GEMM bytes, alone, beside)."""
    from minidu.kernels.decode_attention import decode_attention
    from minidu.kernels.gemm import gemm

    m, n, k = args.gemm_shape
    x, w = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    q, k_cache, v_cache, seq_lens, tables, nbytes = decode_inputs(args)
    scale, out = args.head_dim ** -0.5, torch.empty_like(q)
    gemm_bytes = 2.0 * (n * k + m * k + m * n)
    runs = []
    for s_d in args.decode_budgets:
        s_p = num_sms - s_d
        decode = lambda: decode_attention(q, k_cache, v_cache, seq_lens, tables, scale=scale, num_sms=s_d, out=out)
        prefill = lambda: gemm(x, w, num_sms=s_p)
        d_alone, p_alone = timed(decode), timed(prefill)
        d_beside, p_beside = timed_side_by_side(decode, prefill, repeats=max(1, round(p_alone / d_alone)))
        runs.append((nbytes, d_alone, d_beside, gemm_bytes, p_alone, p_beside))
        print(f"co-run S_d={s_d:>3}: decode {1e6 * d_alone:.0f} -> {1e6 * d_beside:.0f} us, "
              f"GEMM {1e6 * p_alone:.0f} -> {1e6 * p_beside:.0f} us")
    return runs


def timed(fn, iters: int = 20) -> float:
    """Median seconds of fn over CUDA events, after a warm-up."""
    fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return sorted(times)[len(times) // 2]


def timed_side_by_side(decode, prefill, repeats: int, iters: int = 20) -> tuple[float, float]:
    """Median seconds per decode call (of `repeats` back to back) and of the prefill call while both streams run."""
    streams = torch.cuda.Stream(), torch.cuda.Stream()
    d_times, p_times = [], []
    for _ in range(iters):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        torch.cuda.synchronize()
        with torch.cuda.stream(streams[0]):
            events[0].record()
            for _ in range(repeats):
                decode()
            events[1].record()
        with torch.cuda.stream(streams[1]):
            events[2].record()
            prefill()
            events[3].record()
        torch.cuda.synchronize()
        d_times.append(events[0].elapsed_time(events[1]) * 1e-3 / repeats)
        p_times.append(events[2].elapsed_time(events[3]) * 1e-3)
    return sorted(d_times)[iters // 2], sorted(p_times)[iters // 2]


def period_overhead(iters: int = 50) -> float:
    """Seconds a two-stream period adds over one stream: two tiny kernels forked onto two streams, joined and synced
    from the host, against the same two kernels on one stream with one sync."""
    import time

    from minidu.kernels.gemm import gemm

    x = torch.randn(16, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(128, 128, device="cuda", dtype=torch.bfloat16)
    streams = torch.cuda.Stream(), torch.cuda.Stream()

    def one_stream():
        gemm(x, w, num_sms=8)
        gemm(x, w, num_sms=8)
        torch.cuda.synchronize()

    def two_streams():
        main = torch.cuda.current_stream()
        for stream in streams:
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                gemm(x, w, num_sms=8)
            main.wait_stream(stream)
        torch.cuda.synchronize()

    def host_seconds(fn) -> float:
        fn()
        samples = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return sorted(samples)[iters // 2]

    return max(0.0, host_seconds(two_streams) - host_seconds(one_stream))


def decode_inputs(args: argparse.Namespace):
    """Paged decode-attention inputs (q, caches, lengths, block tables) and the bytes one call moves."""
    blocks_per_seq = math.ceil(args.context / args.block_size)
    num_blocks = args.batch * blocks_per_seq
    cache_shape = (num_blocks, args.block_size, args.num_kv_heads, args.head_dim)
    k_cache = torch.randn(cache_shape, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(cache_shape, device="cuda", dtype=torch.bfloat16)
    # A random permutation scatters each request's blocks over the cache, as paging does.
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(args.batch, blocks_per_seq)
    seq_lens = torch.full((args.batch,), args.context, device="cuda", dtype=torch.int32)
    q = torch.randn(args.batch, args.num_heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
    nbytes = 2 * (2 * args.batch * args.context * args.num_kv_heads * args.head_dim + 2 * q.numel())
    return q, k_cache, v_cache, seq_lens, block_tables, float(nbytes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("calibrate_hw.py measures Triton kernels on a GPU and needs CUDA; nothing to do on this machine.")
        return 0
    import triton

    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    budgets = sorted(set(range(args.step, num_sms + 1, args.step)) | {num_sms})
    flops = gemm_flops(budgets, *args.gemm_shape)
    bandwidth = decode_bandwidth(budgets, args)
    metadata = {
        "gpu": props.name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "gemm_shape": "x".join(map(str, args.gemm_shape)),
        "decode_attention": f"batch={args.batch} context={args.context} heads={args.num_heads}/{args.num_kv_heads} "
                            f"head_dim={args.head_dim} block_size={args.block_size}",
    }
    profile = build_profile(args.name or props.name, num_sms, flops, bandwidth, args.layer_overhead,
                            float(props.total_memory), metadata)
    m, n, k = args.gemm_shape
    efficiency = fit_gemm_efficiency(profile, n, k, num_sms, gemm_seconds_by_tokens(args.gemm_tokens, n, k, num_sms))
    runs = corun_runs(args, num_sms)
    profile = with_physics(profile, gemm_efficiency_by_tokens=efficiency,
                           corun_decode_slowdown=fit_corun_slowdown(profile, runs), period_overhead=period_overhead(),
                           metadata=metadata | {"calibrated": "true", "corun_runs": json.dumps(runs)})
    print(f"GEMM efficiency by rows: {efficiency}; co-run decode slowdown {profile.corun_decode_slowdown:.3f}; "
          f"period overhead {1e6 * profile.period_overhead:.0f} us")
    print(f"{'SMs':>5} {'TFLOP/s':>9} {'TB/s':>7}")
    for s in budgets:
        print(f"{s:>5} {flops[s] / 1e12:>9.1f} {bandwidth[s] / 1e12:>7.2f}")
    print(f"bandwidth saturates at {profile.bandwidth_saturation_sms} SMs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(profile.to_json() + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
