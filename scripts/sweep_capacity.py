"""Serving capacity: for each policy and workload, the highest request rate whose SLO attainment stays at or above a
target (90%), found by doubling the rate until attainment drops below it and then bisecting, with the same seed (so
the same requests, only closer together) at every probe. Prints a table with the duet/aggregated capacity ratio.

    python scripts/sweep_capacity.py                                    # sim backend, qwen3-8b on an H200
    python scripts/sweep_capacity.py --policies aggregated static duet --workloads azure-conv --out sweep.json \
        --plot sweep.png
"""
import argparse
import json
import time
from pathlib import Path

from bench_serving import POLICIES, WORKLOADS, add_engine_args, add_workload_args, run_once


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    add_workload_args(p)
    p.set_defaults(num_requests=200, trace=None)
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=["aggregated", "duet"])
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=["azure-conv", "azure-code"])
    p.add_argument("--target", type=float, default=0.9, help="SLO attainment a rate must keep")
    p.add_argument("--start-rate", type=float, default=4.0, help="first rate probed, req/s")
    p.add_argument("--max-rate", type=float, default=1024.0, help="stop doubling here")
    p.add_argument("--tolerance", type=float, default=0.05, help="bisect until the bracket is this fraction of its top")
    p.add_argument("--out", default=None, help="write capacities and every probe here as JSON")
    p.add_argument("--plot", default=None, help="save SLO attainment against rate here (needs matplotlib)")
    args = p.parse_args()
    if not 0 < args.target <= 1:
        p.error(f"--target must be in (0, 1], got {args.target}")
    if not 0 < args.tolerance < 1:
        p.error(f"--tolerance must be in (0, 1), got {args.tolerance}")
    return args


def find_capacity(args: argparse.Namespace, policy: str, workload: str) -> tuple[float, list[dict]]:
    """(capacity in req/s, 0 if even the smallest probe misses the target; every probe's metrics by rate).
    Bisection assumes attainment falls with rate, which holds up to the noise of a finite run."""
    probes: dict[float, dict] = {}

    def passes(rate: float) -> bool:
        if rate not in probes:
            probes[rate] = run_once(args, policy, workload, rate)[0]
        return probes[rate]["slo_attainment"] >= args.target

    lo, hi = 0.0, args.start_rate
    while passes(hi):
        lo, hi = hi, 2 * hi
        if hi > args.max_rate:
            return lo, [probes[r] for r in sorted(probes)]
    while hi - lo > args.tolerance * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if passes(mid) else (lo, mid)
    return lo, [probes[r] for r in sorted(probes)]


def print_table(results: list[dict], policies: list[str], workloads: list[str], target: float) -> None:
    capacity = {(r["policy"], r["workload"]): r["capacity_req_s"] for r in results}
    ratio = "aggregated" in policies and "duet" in policies
    print(f"\ncapacity (req/s at >= {100 * target:g}% SLO attainment)")
    print(f"{'workload':<12}" + "".join(f"{p:>15}" for p in policies) + (f"{'duet/aggr.':>12}" if ratio else ""))
    for w in workloads:
        line = f"{w:<12}" + "".join(f"{capacity[p, w]:>15.2f}" for p in policies)
        if ratio:
            line += f"{capacity['duet', w] / capacity['aggregated', w]:>12.2f}" if capacity["aggregated", w] else \
                f"{'-':>12}"
        print(line)


def plot(results: list[dict], workloads: list[str], target: float, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'minidu[plot]'): skipping the plot")
        return
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 3.6), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        for r in (r for r in results if r["workload"] == w):
            rates = [p["rate"] for p in r["probes"]]
            line, = ax.plot(rates, [100 * p["slo_attainment"] for p in r["probes"]], "o-", ms=3, label=r["policy"])
            ax.axvline(r["capacity_req_s"], color=line.get_color(), ls=":", lw=1)
        ax.axhline(100 * target, color="gray", ls="--", lw=1)
        ax.set(title=w, xlabel="request rate (req/s)", ylabel="SLO attainment (%)", ylim=(0, 102))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    results = []
    for workload in args.workloads:
        for policy in args.policies:
            capacity, probes = find_capacity(args, policy, workload)
            results.append({"policy": policy, "workload": workload, "capacity_req_s": capacity, "probes": probes})
            print(f"{policy:>14} on {workload:<11}: {capacity:7.2f} req/s after {len(probes)} probes "
                  f"({time.perf_counter() - start:.0f} s)")
    print_table(results, args.policies, args.workloads, args.target)
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
        Path(args.out).write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    if args.plot:
        plot(results, args.workloads, args.target, args.plot)


if __name__ == "__main__":
    main()
