"""scripts/gpu_check.py in its dry mode (interpreter, tiny shapes) end to end, so that the GPU run cannot rot, and its
time-budget and result-parsing logic."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402
from gpu_check_parts import pytest_counts  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_dry_run_completes_every_part(dry_run):
    result, _ = dry_run
    parts = result["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    assert {n: p["status"] for n, p in parts.items() if p["status"] != "ok"} == {"isolation": "skipped"}
    assert parts["pytest"]["counts"] == {"passed": 1}


def test_dry_run_checks_hold(dry_run):
    parts = dry_run[0]["parts"]
    kernels = parts["kernels"]["rows"]
    assert len({r["family"] for r in kernels}) == 9
    assert all(r["close_to_fp32_reference"] and r["bitwise_equal_across_budgets"] for r in kernels), kernels
    runs = parts["engine"]["runs"]
    assert set(runs) == {"aggregated", "eager", "duet", "duet-eager", "static"}
    assert all(r["identical_to_aggregated"] for r in runs.values()), runs
    assert runs["duet"]["max_k"] > 1 and runs["duet-eager"]["multiplexed_steps"] > 0
    for policy in ("aggregated", "duet"):
        metrics = parts["serving"]["results"][policy]
        assert metrics["num_completed"] == 3 and metrics["latency_model_error"]["num_steps"] > 0
    assert {"gemm", "decode", "prefill", "copy_bandwidth_gb_s"} <= set(parts["perf"])


def test_markdown_names_the_versions(dry_run):
    result, md = dry_run
    env = result["environment"]
    assert "| GPU | SMs | driver | torch | triton | CUDA |" in md
    assert f"| {env['torch']} | {env['triton']} |" in md
    assert all(f"| {name} | {part['status']} |" in md for name, part in result["parts"].items())


def test_spent_budget_skips_parts_and_still_writes(tmp_path):
    assert gpu_check.main(["--dry", "--budget-s", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {p["status"] for p in result["parts"].values()} == {"skipped"}


def test_a_part_past_its_time_is_stopped(tmp_path):
    opts = gpu_check.parse_args(["--dry"])
    report = gpu_check.run_child("kernels", opts, timeout=0.5)
    assert report["status"] == "timed out" and report["seconds"] < 30


def test_pytest_counts_from_summary_and_from_progress():
    assert pytest_counts("..F.s\n1 failed, 3 passed, 1 skipped in 2.0s") == {"failed": 1, "passed": 3, "skipped": 1}
    assert pytest_counts("x\n1 passed, 2 errors in 1s") == {"passed": 1, "error": 2}
    partial = "..s.F [ 10%]\n..E"
    assert pytest_counts(partial) == {"passed": 5, "failed": 1, "error": 1, "skipped": 1}
