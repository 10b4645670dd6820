"""Online serving benchmark: replays a workload (synthetic or a CSV trace) at a request rate against one scheduling
policy, on the simulated GPU (latency model, virtual clock) or the real one, and reports TTFT, time between tokens,
throughput, SLO attainment and goodput.

    python scripts/bench_serving.py --backend sim --model qwen3-8b --gpu h200 --policy duet --workload azure-conv \
        --rate 4 --num-requests 300 --tbt-slo-ms 50 --out r.json --timeline timeline.json
    python scripts/bench_serving.py --backend gpu --model Qwen/Qwen3-8B --policy duet --workload azure-code --rate 2
    python scripts/bench_serving.py --backend openai --base-url http://127.0.0.1:8000 --workload azure-code --rate 2
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

from minidu.benchmarks.workloads import WORKLOADS
from minidu.scheduler.policy import POLICIES


def add_engine_args(p: argparse.ArgumentParser, backends: tuple[str, ...] = ("sim", "gpu")) -> None:
    """The engine and SLO options bench_serving and sweep_capacity share."""
    p.add_argument("--backend", choices=backends, default="sim")
    p.add_argument("--model", default="qwen3-8b", help="preset name, checkpoint directory, GGUF file or Hub repo id")
    p.add_argument("--gpu", default=None, help="h100, h200, a100 or a profile JSON: the simulated GPU (sim, default "
                   "h200) or the latency model's profile for static/duet (gpu, default: from the device name)")
    p.add_argument("--tbt-slo-ms", type=float, default=50.0, help="time-between-tokens objective (duet plans for it)")
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0, help="time-to-first-token objective")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of a step (the engine's default); larger budgets let prefill chunks break the "
                        "TBT objective in aggregated steps, the regime DuetServe addresses")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--decode-sms", type=int, default=None, help="decode SMs of the static policy (default: half)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs the model is sharded over (sim only so far: per-rank work plus NVLink all-reduces)")
    p.add_argument("--seed", type=int, default=0)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape of inter-arrival gaps (1: Poisson)")
    p.add_argument("--input-len", type=int, default=1024, help="prompt tokens (fixed) or their mean (random)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens (fixed) or their mean (random)")
    p.add_argument("--range-ratio", type=float, default=0.5, help="random: lengths uniform in mean * (1 +- ratio)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, backends=("sim", "gpu", "openai"))
    add_workload_args(p)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="openai: the server to measure (minidu serve, "
                   "vLLM, SGLang); the engine options are the server's own")
    p.add_argument("--vocab-size", type=int, default=1000, help="openai: random prompt token ids are below this")
    p.add_argument("--policy", choices=POLICIES, default="duet")
    p.add_argument("--workload", choices=WORKLOADS, default="azure-conv")
    p.add_argument("--rate", type=float, default=4.0, help="requests/s (inf: all at once); ignored with --trace")
    p.add_argument("--trace", default=None, help="CSV with columns timestamp,input_len,output_len (replaces "
                   "--workload and --rate; its first --num-requests rows)")
    p.add_argument("--out", default=None, help="write the metrics here as JSON")
    p.add_argument("--timeline", default=None, help="write every step and each request's token times here as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args()


def make_engine(args: argparse.Namespace, policy: str):
    import minidu

    hardware = args.gpu or ("h200" if args.backend == "sim" else None)
    engine = minidu.Engine(args.model, backend=args.backend, policy=policy, tbt_slo_ms=args.tbt_slo_ms,
                           hardware=hardware, decode_sms=args.decode_sms, seed=args.seed,
                           max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                           tensor_parallel_size=args.tensor_parallel_size)
    if args.backend == "gpu":  # compile kernels and capture graphs before the clock starts
        engine.generate([[1, 2, 3, 4]], minidu.SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    return engine


def make_specs(args: argparse.Namespace, workload: str, rate: float):
    from minidu.benchmarks.workloads import load_trace, synthetic_workload

    if args.trace:
        return load_trace(args.trace, args.num_requests)
    return synthetic_workload(workload, args.num_requests, rate, burstiness=args.burstiness, seed=args.seed,
                              input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio)


def run_openai(args: argparse.Namespace) -> dict:
    """The benchmark as a streaming client of an OpenAI-compatible server: times on the client's clock."""
    from minidu.benchmarks.metrics import serving_metrics
    from minidu.benchmarks.openai_client import run_workload

    run = run_workload(args.base_url, make_specs(args, args.workload, args.rate), vocab_size=args.vocab_size,
                       seed=args.seed)
    metrics = serving_metrics(run.outputs, [], ttft_slo_ms=args.ttft_slo_ms, tbt_slo_ms=args.tbt_slo_ms,
                              workload=f"trace:{Path(args.trace).name}" if args.trace else args.workload,
                              rate=None if args.trace or math.isinf(args.rate) else args.rate, policy="server")
    return metrics | {"model": run.model, "backend": "openai", "base_url": args.base_url,
                      "num_preemptions": run.num_preemptions, "seed": args.seed}


def run_once(args: argparse.Namespace, policy: str, workload: str, rate: float, progress: bool = False):
    """One benchmark run: (metrics dict, ServingRun)."""
    from minidu.benchmarks.metrics import serving_metrics
    from minidu.benchmarks.serving import run_workload

    engine = make_engine(args, policy)
    specs = make_specs(args, workload, rate)
    check_lengths(specs, engine.max_model_len)
    run = run_workload(engine, specs, seed=args.seed, progress=progress)
    metrics = serving_metrics(run.outputs, [s.mode for s in run.steps], ttft_slo_ms=args.ttft_slo_ms,
                              tbt_slo_ms=args.tbt_slo_ms, policy=policy,
                              workload=f"trace:{Path(args.trace).name}" if args.trace else workload,
                              rate=None if args.trace or math.isinf(rate) else rate,
                              step_durations=[s.end - s.start for s in run.steps],
                              step_predictions=[s.predicted for s in run.steps])
    from minidu.benchmarks.metrics import prediction_error_by_kind

    metrics["latency_model_error_by_kind"] = prediction_error_by_kind([p for s in run.steps for p in s.parts or []])
    metrics |= {"model": args.model, "backend": args.backend, "gpu": hardware_name(args, engine),
                "num_sms": engine.num_sms, "num_preemptions": engine.scheduler.num_preemptions,
                "max_num_batched_tokens": args.max_num_batched_tokens, "seed": args.seed}
    return metrics, run


def check_lengths(specs, max_model_len: int) -> None:
    """Refuses a workload whose requests would be rejected or cut short by max_model_len, instead of reporting them
    as missing requests."""
    too_long = [s for s in specs if s.input_len + s.output_len > max_model_len]
    if too_long:
        worst = max(too_long, key=lambda s: s.input_len + s.output_len)
        raise SystemExit(f"{len(too_long)}/{len(specs)} requests need more than max_model_len={max_model_len} tokens "
                         f"(e.g. input {worst.input_len} + output {worst.output_len}); lower --input-len/--output-len")


def hardware_name(args: argparse.Namespace, engine) -> str | None:
    """The profile the latency model used (sim, static, duet) or the device's name."""
    if engine.latency_model is not None:
        return engine.latency_model.hw.name
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def print_summary(m: dict) -> None:
    def row(name: str, stats: dict) -> str:
        return f"{name:<10}" + "".join(f"{'-' if stats[k] is None else f'{stats[k]:.1f}':>10}" for k in stats)

    rate = "" if m["rate"] is None else f" at {m['rate']:g} req/s"
    print(f"\n{m['policy']} on {m['workload']}{rate}: {m['num_completed']}/{m['num_requests']} requests "
          f"in {m['duration_s']:.2f} s ({m['backend']} backend)")
    print(f"{'ms':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    print(row("TTFT", m["ttft_ms"]))
    print(row("TBT", m["tbt_ms"]))
    modes = m["mode_fraction"]
    print(f"throughput {m['throughput_req_s']:.2f} req/s, {m['output_tok_s']:.0f} output tok/s; "
          f"SLO attainment {100 * m['slo_attainment']:.1f}% (TTFT <= {m['ttft_slo_ms']:g} ms, p99 TBT <= "
          f"{m['tbt_slo_ms']:g} ms), goodput {m['goodput_req_s']:.2f} req/s")
    if m["backend"] != "openai":  # a client does not see the server's steps
        print(f"steps: {100 * modes['aggregated']:.1f}% aggregated, {100 * modes['multiplexed']:.1f}% multiplexed; "
              f"{m['num_preemptions']} preemptions")
    if (err := m["latency_model_error"]) is not None and m["backend"] != "sim":
        print(f"latency model error |predicted - measured| / measured over {err['num_steps']} steps: "
              f"median {100 * err['median']:.1f}%, p90 {100 * err['p90']:.1f}%")
        for kind, e in m["latency_model_error_by_kind"].items():
            if e is not None:
                print(f"  {kind}: median {100 * e['median']:.1f}%, p90 {100 * e['p90']:.1f}% over {e['num_steps']}")


def main() -> None:
    args = parse_args()
    from minidu.benchmarks.serving import timeline

    if args.backend == "openai" and args.timeline:
        sys.exit("bench_serving.py: error: --timeline needs the engine's steps, which --backend openai does not see")
    start = time.perf_counter()
    try:
        if args.backend == "openai":
            metrics, run = run_openai(args), None
        else:
            metrics, run = run_once(args, args.policy, args.workload, args.rate, progress=not args.no_progress)
    except ValueError as e:  # bad settings, workload or trace: the message names the culprit
        sys.exit(f"bench_serving.py: error: {e}")
    metrics["bench_seconds"] = time.perf_counter() - start
    print_summary(metrics)
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    if args.timeline:
        meta = {k: metrics[k] for k in ("policy", "workload", "rate", "model", "backend", "gpu", "num_sms",
                                      "tbt_slo_ms", "ttft_slo_ms")}
        Path(args.timeline).write_text(json.dumps(timeline(run, meta)) + "\n")


if __name__ == "__main__":
    main()
