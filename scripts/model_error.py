"""The latency model against measured steps: median and p90 of |predicted - measured| / measured per step kind
(aggregated, multiplexed prefill, multiplexed decode), from the --timeline JSON of a bench_serving run, the figure
Vidur (under 9%) and MuxWise (about 9%) publish for their simulators.

    python scripts/bench_serving.py --backend gpu --model qwen3-8b --policy duet --timeline t.json  # dummy weights
    python scripts/model_error.py t.json
"""
import argparse
import json
import sys
from pathlib import Path

from minidu.benchmarks.metrics import prediction_error_by_kind


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("timeline", type=Path, help="a bench_serving --timeline JSON")
    p.add_argument("--out", type=Path, default=None, help="write the report here as JSON")
    args = p.parse_args(argv)
    steps = json.loads(args.timeline.read_text())["steps"]
    parts = [tuple(part) for s in steps for part in (s.get("parts") or [])]
    if not parts:
        sys.exit(f"model_error.py: error: {args.timeline} has no step with predicted and measured times "
                 f"(was the engine's policy one with a latency model, and the timeline written by this version?)")
    report = prediction_error_by_kind(parts)
    print(f"{'step kind':<22}{'steps':>8}{'median':>10}{'p90':>10}")
    for kind, err in report.items():
        if err is None:
            print(f"{kind:<22}{0:>8}{'-':>10}{'-':>10}")
        else:
            print(f"{kind:<22}{err['num_steps']:>8}{100 * err['median']:>9.1f}%{100 * err['p90']:>9.1f}%")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
