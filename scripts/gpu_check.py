"""One prepared GPU evidence run: the test suite on CUDA, every kernel's budget invariance and accuracy, the engine's
tokens across policies, kernel speed against PyTorch, spatial isolation of two SM budgets (with green contexts and a
%smid probe) and a short serving run, most important first, within a time budget.

    python scripts/gpu_check.py                   # on a CUDA GPU: at most --budget-s seconds (default 350)
    python scripts/gpu_check.py --dry --out DIR   # anywhere: Triton's interpreter and tiny shapes (the suite runs it)

Each part runs in a child process that the parent stops at its share of the budget; after every part the parent
rewrites `benchmarks/results/<date>-<gpu>/gpu_check.json` and a markdown summary (`gpu_check.md`) with what it has.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("pytest", "kernels", "engine", "perf", "isolation", "serving")
# Seconds a part may take at most on a GPU, Triton compiles included; the budget left caps it further.
GPU_CAPS = {"pytest": 110, "kernels": 70, "engine": 50, "perf": 40, "isolation": 30, "serving": 90}
DRY_CAP = 120
# The SM budgets every kernel must be bitwise invariant over: 1, powers of two, an odd count, half and all of an H200.
GPU_BUDGETS = (1, 16, 17, 66, 132)
DRY_BUDGETS = (1, 2, 3)


# ---- the parent: budget, children, results ----

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="interpreted, tiny shapes: checks that the script runs")
    p.add_argument("--budget-s", type=float, default=350.0, help="wall-clock seconds for the whole run")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<date>-<gpu>)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-timeout", type=float, default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.parts = [s for s in opts.parts.split(",") if s]
    if unknown := set(opts.parts) - set(PARTS):
        p.error(f"--parts: unknown {sorted(unknown)}")
    if opts.budget_s <= 0:
        p.error("--budget-s must be > 0")
    return opts


def environment(dry: bool) -> dict:
    import torch
    import triton

    env = {"date": datetime.date.today().isoformat(), "python": sys.version.split()[0], "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda, "dry": dry}
    if dry or not torch.cuda.is_available():
        return env | {"gpu": "cpu-interpreter", "driver": None, "num_sms": None}
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = None
    return env | {"gpu": props.name, "driver": driver, "num_sms": props.multi_processor_count,
                  "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
                  "green_contexts": hasattr(torch.cuda, "green_contexts")}


def out_dir(env: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
    return ROOT / "benchmarks" / "results" / f"{env['date']}-{slug}"


def run_child(part: str, opts, timeout: float) -> dict:
    """Runs one part in a child process, stopped after `timeout` seconds; returns what it reported, with its status."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "part.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part, "--child-result", str(result_path),
               "--child-timeout", str(timeout)] + (["--dry"] if opts.dry else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        if opts.dry:
            env["TRITON_INTERPRET"] = "1"
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            status = "ok" if proc.returncode == 0 else "failed"
            log = proc.stdout[-2000:] + proc.stderr[-3000:]
        except subprocess.TimeoutExpired as e:
            status, log = "timed out", _text(e.stdout)[-2000:] + _text(e.stderr)[-3000:]
        report = json.loads(result_path.read_text()) if result_path.exists() else {}
    return {"status": status, "seconds": round(time.monotonic() - start, 1), **report,
            **({"log_tail": log} if status != "ok" else {})}


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def write_results(folder: Path, result: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (folder / "gpu_check.md").write_text(markdown(result))


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# gpu_check {env['date']}{' (dry run: interpreter, tiny shapes)' if env['dry'] else ''}", "",
             "| GPU | SMs | driver | torch | triton | CUDA |", "|---|---|---|---|---|---|",
             f"| {env['gpu']} | {env.get('num_sms')} | {env.get('driver')} | {env['torch']} | {env['triton']} "
             f"| {env['cuda']} |", "", "| part | status | seconds | summary |", "|---|---|---|---|"]
    for name, part in result["parts"].items():
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', '')} | {part.get('summary', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.child:
        return child_main(opts)
    deadline = time.monotonic() + opts.budget_s
    env = environment(opts.dry)
    folder = opts.out or out_dir(env)
    result = {"environment": env, "budget_s": opts.budget_s, "parts": {}}
    write_results(folder, result)
    for part in opts.parts:
        left = deadline - time.monotonic()
        if left < 10:
            result["parts"][part] = {"status": "skipped", "summary": "time budget spent"}
        elif opts.dry and part == "isolation":
            result["parts"][part] = {"status": "skipped", "summary": "needs CUDA streams and %smid"}
        else:
            result["parts"][part] = run_child(part, opts, min(DRY_CAP if opts.dry else GPU_CAPS[part], left))
        write_results(folder, result)
        print(f"{part}: {result['parts'][part]['status']} {result['parts'][part].get('summary', '')}", flush=True)
    print(f"wrote {folder / 'gpu_check.json'}")
    return 0


# ---- the child: one part ----

class Context:
    """What a part needs: the mode, the device, the budgets, and `save` to leave partial results for the parent."""

    def __init__(self, opts):
        import torch

        from minidu.kernels.platform import INTERPRET

        self.dry, self.interpret = opts.dry, INTERPRET
        if self.dry != INTERPRET:
            raise RuntimeError("--dry needs Triton's interpreter, and a full run a CUDA GPU")
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.dtype = torch.float32 if self.dry else torch.bfloat16
        self.num_sms = 1 if self.dry else torch.cuda.get_device_properties(0).multi_processor_count
        self.budgets = DRY_BUDGETS if self.dry else tuple(b for b in GPU_BUDGETS if b <= self.num_sms)
        self.deadline = time.monotonic() + opts.child_timeout - 5
        self.path, self.report = opts.child_result, {}

    def save(self, **fields) -> None:
        self.report.update(fields)
        self.path.write_text(json.dumps(self.report, default=str))

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


def child_main(opts) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_kernels' cases
    ctx = Context(opts)
    import gpu_check_parts

    getattr(gpu_check_parts, f"part_{opts.child}")(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
