"""Measures the throughput of minidu's own GEMM (compute-bound) and decode attention (bandwidth-bound) at SM budgets
from a few SMs to the whole GPU, and writes the HardwareProfile JSON that the scheduler's latency model loads.

    python scripts/calibrate_hw.py --out benchmarks/results/h200-profile.json
"""
import argparse
import datetime
import math
import sys
from pathlib import Path

import minidu  # noqa: F401  (chooses compiled vs interpreted Triton before triton is imported)
import torch

from minidu.scheduler.hardware import HardwareProfile

# Smallest budget whose bandwidth reaches this fraction of the best one is reported as the saturation point.
SATURATION_FRACTION = 0.95


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

    blocks_per_seq = math.ceil(args.context / args.block_size)
    num_blocks = args.batch * blocks_per_seq
    cache_shape = (num_blocks, args.block_size, args.num_kv_heads, args.head_dim)
    k_cache = torch.randn(cache_shape, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(cache_shape, device="cuda", dtype=torch.bfloat16)
    # A random permutation scatters each request's blocks over the cache, as paging does.
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(args.batch, blocks_per_seq)
    seq_lens = torch.full((args.batch,), args.context, device="cuda", dtype=torch.int32)
    q = torch.randn(args.batch, args.num_heads, args.head_dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    scale = args.head_dim ** -0.5
    nbytes = 2 * (2 * args.batch * args.context * args.num_kv_heads * args.head_dim + 2 * q.numel())
    table = {}
    for s in budgets:
        ms = do_bench(lambda: decode_attention(q, k_cache, v_cache, seq_lens, block_tables, scale=scale, num_sms=s,
                                               out=out), return_mode="median")
        table[s] = nbytes / (ms * 1e-3)
    return table


def build_profile(name: str, num_sms: int, flops_by_sms: dict[int, float], bandwidth_by_sms: dict[int, float],
                  layer_overhead: float, metadata: dict[str, str]) -> HardwareProfile:
    """A profile whose peaks are the best measurements and whose saturation point is the first budget within
    SATURATION_FRACTION of the best bandwidth."""
    best_bandwidth = max(bandwidth_by_sms.values())
    saturation = min(s for s, bw in bandwidth_by_sms.items() if bw >= SATURATION_FRACTION * best_bandwidth)
    return HardwareProfile(name, num_sms, max(flops_by_sms.values()), best_bandwidth, saturation, layer_overhead,
                           flops_by_sms, bandwidth_by_sms, metadata)


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
    profile = build_profile(args.name or props.name, num_sms, flops, bandwidth, args.layer_overhead, metadata)
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
