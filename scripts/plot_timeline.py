"""One serving run over time, from the --timeline JSON of bench_serving.py: how each step used the SMs (all of them
shared, or split between prefill and k decode steps), how many tokens it ran, and every gap between two tokens of a
request against the TBT objective.

    python scripts/bench_serving.py --policy duet --workload azure-code --rate 12 --num-requests 80 --timeline t.json
    python scripts/plot_timeline.py t.json --out timeline.png
"""
import argparse
import json
import sys

COLORS = {"aggregated": "#9e9ac8", "prefill": "#fd8d3c", "decode": "#3182bd", "miss": "#d62728", "ok": "#636363"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("timeline", help="JSON written by bench_serving.py --timeline")
    p.add_argument("--out", default="timeline.png")
    p.add_argument("--start", type=float, default=None, help="first second to show")
    p.add_argument("--end", type=float, default=None, help="last second to show")
    return p.parse_args()


def plot_sm_split(ax, steps: list[dict]) -> None:
    """Aggregated steps give every SM to the whole batch; multiplexed ones stack prefill SMs on decode SMs."""
    def bar(sel: list[dict], bottom, height, kind: str, label: str) -> None:
        ax.bar([s["start"] for s in sel], [height(s) for s in sel], [s["end"] - s["start"] for s in sel],
               [bottom(s) for s in sel], align="edge", color=COLORS[kind], lw=0, label=label)

    aggregated = [s for s in steps if s["mode"] == "aggregated"]
    multiplexed = [s for s in steps if s["mode"] == "multiplexed"]
    bar(aggregated, lambda s: 0, lambda s: s["num_sms"], "aggregated", "aggregated (all SMs)")
    bar(multiplexed, lambda s: 0, lambda s: s["num_sms_decode"], "decode", "decode SMs")
    bar(multiplexed, lambda s: s["num_sms_decode"], lambda s: s["num_sms_prefill"], "prefill", "prefill SMs")
    busy = sum(s["end"] - s["start"] for s in steps)
    share = 100 * len(multiplexed) / len(steps) if steps else 0
    time_share = 100 * sum(s["end"] - s["start"] for s in multiplexed) / busy if busy else 0
    ax.set(ylabel="SMs", ylim=(0, 1.3 * max((s["num_sms"] for s in steps), default=1)),
           title=f"SM split per step (multiplexed: {share:.0f}% of steps, {time_share:.0f}% of busy time)")
    ax.legend(loc="upper right", fontsize=8, ncols=3)


def plot_tokens(ax, steps: list[dict]) -> None:
    """Tokens per step over each step's span, broken where the engine idled (a multiplexed step counts its k decode
    steps); log scale because a prefill chunk holds thousands of tokens and a decode batch tens."""
    for key, kind in (("prefill_tokens", "prefill"), ("decode_tokens", "decode")):
        xs, ys, previous_end = [], [], None
        for s in steps:
            if previous_end is not None and s["start"] > previous_end + 1e-9:
                xs.append(previous_end)
                ys.append(float("nan"))
            xs += [s["start"], s["end"]]
            ys += [s[key] or float("nan")] * 2
            previous_end = s["end"]
        ax.plot(xs, ys, color=COLORS[kind], lw=0.8, label=f"{kind} tokens")
    ks = [(s["start"], s["k"]) for s in steps if s["mode"] == "multiplexed"]
    if ks:
        ax2 = ax.twinx()
        ax2.plot(*zip(*ks), "k.", ms=3, label="k of a multiplexed step")
        ax2.set(ylabel="k (decode steps per period)", ylim=(0, max(k for _, k in ks) + 1))
        ax2.legend(loc="upper left", fontsize=8)
    ax.set(ylabel="tokens per step", yscale="log")
    ax.legend(loc="upper right", fontsize=8)


def plot_gaps(ax, requests: list[dict], tbt_slo_ms: float) -> None:
    """Every gap between consecutive tokens of a request, at the time of the later token."""
    points = [(b, 1e3 * (b - a)) for r in requests for a, b in zip(r["token_times"], r["token_times"][1:])]
    for kind, keep in (("ok", lambda g: g <= tbt_slo_ms), ("miss", lambda g: g > tbt_slo_ms)):
        sel = [(t, g) for t, g in points if keep(g)]
        if sel:
            ax.scatter(*zip(*sel), s=3 if kind == "ok" else 10, color=COLORS[kind], alpha=0.5, lw=0,
                       label=f"{len(sel)} gaps {'>' if kind == 'miss' else '<='} SLO")
    ax.axhline(tbt_slo_ms, color=COLORS["miss"], ls="--", lw=1, label=f"TBT SLO {tbt_slo_ms:g} ms")
    ax.set(ylabel="time between tokens (ms)", xlabel="time (s)", ylim=(0, None))
    ax.legend(loc="upper right", fontsize=8, markerscale=2)


def main() -> None:
    args = parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_timeline.py needs matplotlib: pip install 'minidu[plot]'")
    with open(args.timeline) as f:
        data = json.load(f)
    meta, steps, requests = data["meta"], data["steps"], data["requests"]
    lo = args.start if args.start is not None else 0.0
    hi = args.end if args.end is not None else max((s["end"] for s in steps), default=1.0)
    steps = [s for s in steps if s["end"] >= lo and s["start"] <= hi]
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True, height_ratios=(1, 1, 1.4))
    plot_sm_split(axes[0], steps)
    plot_tokens(axes[1], steps)
    plot_gaps(axes[2], requests, meta["tbt_slo_ms"])
    axes[2].set_xlim(lo, hi)
    rate = f" at {meta['rate']:g} req/s" if meta.get("rate") else ""
    fig.suptitle(f"{meta['policy']}: {meta['model']} on {meta.get('gpu') or '?'} ({meta['backend']}), "
                 f"{meta['workload']}{rate}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
