"""Serving capacity as the field measures it: for each workload and TBT objective, the highest request rate that a
policy serves in steady state with at least 90% SLO attainment, aggregated swept over token budgets (its best budget
is the baseline), duet over its own budgets, plus prefill-first and static. Each probe replays --num-requests
requests (the same seed, only closer together, at every rate); the first --warmup and last --drain fractions of
arrivals are left out of the metrics, and a probe passes only if its attainment meets the target and completions kept
pace with arrivals. The simulated GPU's ground truth (--truth) may differ from the planner's latency model.

    python scripts/sweep_capacity.py --out benchmarks/results/sim-sweep.json --table sweep.md --jobs 2
    python scripts/sweep_capacity.py --workloads azure-code --tbt-slo-ms 50 --budgets 1024 2048 --num-requests 200
    python scripts/sweep_capacity.py --model qwen3-14b --tensor-parallel-size 2 --workloads azure-conv --tbt-slo-ms 50
"""
import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench_serving import add_engine_args, make_engine, make_specs
from minidu.benchmarks.workloads import TRACE_SHAPES

SWEEP_WORKLOADS = tuple(TRACE_SHAPES)  # the DuetServe paper's trace shapes
START_RATES = {"azure-conv": 24.0, "azure-code": 8.0, "mooncake": 1.0}  # req/s, near the expected capacities
# Ground truths of the simulated GPU: "planner" runs steps exactly as the planner predicts; "contention" makes
# multiplexing costlier than the planner's preset assumes (decode beside prefill 20% slower instead of 10%, 300 us
# per period instead of 150 us), both sharing HBM bandwidth between the partitions.
TRUTHS = {"planner": {}, "contention": {"corun_decode_slowdown": 0.2, "period_overhead": 300e-6}}


@dataclass(frozen=True, slots=True)
class Probe:
    workload: str
    tbt_slo_ms: float
    policy: str
    budget: int


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                conflict_handler="resolve")  # --tbt-slo-ms takes several objectives here
    add_engine_args(p)
    p.add_argument("--workloads", nargs="+", choices=SWEEP_WORKLOADS, default=list(SWEEP_WORKLOADS))
    p.add_argument("--tbt-slo-ms", nargs="+", type=float, default=[25.0, 50.0, 100.0], dest="tbt_slos_ms")
    p.add_argument("--budgets", nargs="*", type=int, default=[256, 512, 1024, 2048, 4096, 8192],
                   help="token budgets (max_num_batched_tokens) aggregated is swept over")
    p.add_argument("--duet-budgets", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--others", nargs="*", choices=("prefill-first", "static"), default=["prefill-first", "static"],
                   help="policies also measured, at a 2048-token budget")
    p.add_argument("--truth", choices=sorted(TRUTHS), default="contention")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the first arrivals left out")
    p.add_argument("--drain", type=float, default=0.1, help="fraction of the last arrivals left out")
    p.add_argument("--target", type=float, default=0.9, help="SLO attainment a rate must keep")
    p.add_argument("--tolerance", type=float, default=0.15, help="bisect until the bracket is this fraction of its top")
    p.add_argument("--jobs", type=int, default=1, help="capacity searches run in parallel")
    p.add_argument("--out", default=None, help="capacities and every probe as JSON (rewritten as searches finish)")
    p.add_argument("--table", default=None, help="write the markdown table here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: join the results of earlier sweeps (--out files) into --out and --table")
    args = p.parse_args()
    if not 0 < args.target <= 1 or not 0 < args.tolerance < 1:
        p.error("--target must be in (0, 1] and --tolerance in (0, 1)")
    return args


def probe_args(args: argparse.Namespace, probe: Probe) -> argparse.Namespace:
    """bench_serving's settings for one probe (Poisson arrivals, the workload's length shape)."""
    return argparse.Namespace(**vars(args) | dict(
        max_num_batched_tokens=probe.budget, tbt_slo_ms=probe.tbt_slo_ms, trace=None, burstiness=1.0,
        input_len=1024, output_len=128, range_ratio=0.5))


def run_probe(args: argparse.Namespace, probe: Probe, rate: float) -> dict:
    """Steady-state metrics of one run at `rate` req/s."""
    from minidu.benchmarks.metrics import serving_metrics, steady_state, tracks_rate
    from minidu.scheduler.hardware import with_physics
    from minidu.benchmarks.serving import run_workload, use_ground_truth

    settings = probe_args(args, probe)
    engine = make_engine(settings, probe.policy)
    use_ground_truth(engine, with_physics(engine.latency_model.hw, **TRUTHS[args.truth]))
    run = run_workload(engine, make_specs(settings, probe.workload, rate), seed=args.seed)
    window = steady_state(run.outputs, args.warmup, args.drain)
    m = serving_metrics(window, [s.mode for s in run.steps], ttft_slo_ms=args.ttft_slo_ms,
                        tbt_slo_ms=probe.tbt_slo_ms, rate=rate)
    keeps_up = tracks_rate(run.outputs, window)
    return {"rate": rate, "slo_attainment": m["slo_attainment"], "tracks_rate": keeps_up,
            "passes": keeps_up and m["slo_attainment"] >= args.target, "goodput_req_s": m["goodput_req_s"],
            "ttft_p99_ms": m["ttft_ms"]["p99"], "tbt_p99_ms": m["tbt_ms"]["p99"],
            "multiplexed_fraction": m["mode_fraction"]["multiplexed"]}


def find_capacity(args: argparse.Namespace, probe: Probe) -> dict:
    """Doubles or halves from the workload's start rate to bracket the capacity, then bisects. Assumes attainment
    falls with rate, which holds up to the noise of a finite run."""
    probes: dict[float, dict] = {}

    def passes(rate: float) -> bool:
        if rate not in probes:
            probes[rate] = run_probe(args, probe, rate)
        return probes[rate]["passes"]

    rate = START_RATES[probe.workload]
    if passes(rate):
        lo, hi = rate, 2 * rate
        while passes(hi):
            lo, hi = hi, 2 * hi
    else:
        lo, hi = rate / 2, rate
        while not passes(lo):
            if lo < 1e-2:
                lo = 0.0
                break
            lo, hi = lo / 2, lo
    while hi - lo > args.tolerance * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if passes(mid) else (lo, mid)
    return {"workload": probe.workload, "tbt_slo_ms": probe.tbt_slo_ms, "policy": probe.policy,
            "budget": probe.budget, "capacity_req_s": lo, "probes": [probes[r] for r in sorted(probes)]}


def all_probes(args: argparse.Namespace) -> list[Probe]:
    """Every capacity search, cheapest workloads and the 50 ms objective first, so a cut-short sweep keeps them."""
    order = sorted(args.tbt_slos_ms, key=lambda t: (t != 50.0, t))
    probes = []
    for tbt in order:
        for workload in args.workloads:
            probes += [Probe(workload, tbt, "aggregated", b) for b in args.budgets]
            probes += [Probe(workload, tbt, "duet", b) for b in args.duet_budgets]
            probes += [Probe(workload, tbt, policy, 2048) for policy in args.others]
    return probes


def best(results: list[dict], workload: str, tbt: float, policy: str) -> dict | None:
    found = [r for r in results if (r["workload"], r["tbt_slo_ms"], r["policy"]) == (workload, tbt, policy)]
    return max(found, key=lambda r: r["capacity_req_s"], default=None)


def table(results: list[dict], args: argparse.Namespace) -> str:
    """Markdown: capacity (req/s) per workload and objective; best budgets in parentheses; duet over best aggregated."""
    lines = ["| workload | TBT (ms) | aggregated, best budget | prefill-first | static | duet, best budget | "
             "duet / best aggregated |", "|---|---|---|---|---|---|---|"]
    for workload in args.workloads:
        for tbt in sorted(args.tbt_slos_ms):
            cells = {p: best(results, workload, tbt, p) for p in ("aggregated", "prefill-first", "static", "duet")}
            if not any(cells.values()):
                continue
            text = {p: "-" if r is None else f"{r['capacity_req_s']:.3g}" + (
                f" ({r['budget']})" if p in ("aggregated", "duet") else "") for p, r in cells.items()}
            agg, duet = cells["aggregated"], cells["duet"]
            ratio = f"{duet['capacity_req_s'] / agg['capacity_req_s']:.2f}" if agg and duet and \
                agg["capacity_req_s"] else "-"
            lines.append(f"| {workload} | {tbt:g} | {text['aggregated']} | {text['prefill-first']} | "
                         f"{text['static']} | {text['duet']} | {ratio} |")
    return "\n".join(lines)


def save(args: argparse.Namespace, results: list[dict]) -> None:
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "table", "jobs")}
        settings["truth_overrides"] = TRUTHS[args.truth]
        Path(args.out).write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    if args.table:
        Path(args.table).write_text(table(results, args) + "\n")


def merge(args: argparse.Namespace) -> None:
    """One table from several sweeps' JSON (e.g. run in parallel, one workload each); later files win."""
    found, settings = {}, []
    for path in args.merge:
        data = json.loads(Path(path).read_text())
        settings.append(data["settings"])
        for r in data["results"]:
            found[r["workload"], r["tbt_slo_ms"], r["policy"], r["budget"]] = r
    results = list(found.values())
    args.workloads = [w for w in SWEEP_WORKLOADS if any(r["workload"] == w for r in results)]
    args.tbt_slos_ms = sorted({r["tbt_slo_ms"] for r in results})
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    if args.table:
        Path(args.table).write_text(table(results, args) + "\n")
    print(table(results, args))


def main() -> None:
    args = parse_args()
    if args.merge:
        return merge(args)
    start, results = time.perf_counter(), []
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        futures = [(p, pool.submit(find_capacity, args, p)) for p in all_probes(args)]
        for p, future in futures:
            results.append(future.result())
            print(f"{p.policy:>14} {p.budget:>5} on {p.workload:<10} TBT {p.tbt_slo_ms:g} ms: "
                  f"{results[-1]['capacity_req_s']:7.3f} req/s ({time.perf_counter() - start:.0f} s)", flush=True)
            save(args, results)
    print(table(results, args))


if __name__ == "__main__":
    main()
