"""Online serving on the simulated backend, end to end: every policy finishes every request with the right number of
tokens at causally ordered times; a lone request's latencies are exactly the latency model's; duet keeps the TBT
objective where the latency model says aggregated steps break it; the benchmark scripts run and write their JSON. One
run on the real (here interpreted) backend checks that the wall-clock driver waits for arrivals."""
import json
import sys
from pathlib import Path

import pytest

import minidu
from minidu.benchmarks.metrics import serving_metrics, token_gaps
from minidu.scheduler.hardware import with_physics
from minidu.benchmarks.serving import run_workload, timeline, use_ground_truth
from minidu.benchmarks.workloads import RequestSpec, synthetic_workload

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TBT_SLO_MS, TTFT_SLO_MS = 50.0, 2000.0
BUDGET = 8192
# 4096-token prompts in an 8192-token budget: a mixed step carries a whole prompt next to the decodes.
SPECS = synthetic_workload("fixed", 24, 16.0, seed=0, input_len=4096, output_len=32)


def make_engine(policy: str) -> minidu.Engine:
    return minidu.Engine("qwen3-8b", backend="sim", hardware="h200", policy=policy, tbt_slo_ms=TBT_SLO_MS,
                         max_num_batched_tokens=BUDGET)


@pytest.fixture(scope="module")
def runs():
    runs = {}
    for policy in ("aggregated", "prefill-first", "static", "duet"):
        engine = make_engine(policy)
        runs[policy] = (engine, run_workload(engine, SPECS, seed=1))
    return runs


def metrics(run, policy):
    return serving_metrics(run.outputs, [s.mode for s in run.steps], ttft_slo_ms=TTFT_SLO_MS, tbt_slo_ms=TBT_SLO_MS,
                           policy=policy)


@pytest.mark.parametrize("policy", ["aggregated", "prefill-first", "static", "duet"])
def test_every_request_finishes_with_causal_token_times(runs, policy):
    engine, run = runs[policy]
    assert not engine.has_unfinished_requests()
    assert [o.request_id for o in run.outputs] == [str(i) for i in range(len(SPECS))]
    for spec, out in zip(SPECS, run.outputs):
        assert out.finished and out.finish_reason == "length"
        assert len(out.token_ids) == len(out.token_times) == spec.output_len
        assert len(out.prompt_token_ids) == spec.input_len
        assert out.arrival_time == pytest.approx(run.start_time + spec.arrival_time)
        assert out.first_token_time == out.token_times[0] > out.arrival_time  # nothing is served before it arrives
        assert 0 < out.ttft <= out.token_times[-1] - out.arrival_time
        assert min(token_gaps(out.token_times)) > 0
    for prev, step in zip(run.steps, run.steps[1:]):
        assert prev.start < prev.end <= step.start + 1e-12  # steps run one after another
    m = metrics(run, policy)
    assert sum(m["mode_fraction"].values()) == pytest.approx(1.0)
    assert m["num_completed"] == len(SPECS)


def test_modes_per_policy(runs):
    assert {s.mode for s in runs["aggregated"][1].steps} == {"aggregated"}
    assert {s.mode for s in runs["prefill-first"][1].steps} == {"aggregated"}
    static = runs["static"][1].steps
    assert {s.mode for s in static} == {"multiplexed"}
    assert all(s.num_sms_decode + s.num_sms_prefill == s.num_sms == 132 for s in static)
    assert {s.mode for s in runs["duet"][1].steps} == {"aggregated", "multiplexed"}


def test_prefill_first_never_mixes(runs):
    assert all(s.prefill_tokens == 0 or s.decode_tokens == 0 for s in runs["prefill-first"][1].steps)


def test_duet_keeps_tbt_where_aggregated_breaks_it(runs):
    engine, duet = runs["duet"]
    # the latency model predicts that one decode beside a whole prompt misses the objective on all 132 SMs
    assert engine.policy.model.step_time([(1, 4096), (4096, 0)], 132) > TBT_SLO_MS / 1e3
    aggregated = metrics(runs["aggregated"][1], "aggregated")
    ours = metrics(duet, "duet")

    def late(run) -> float:
        gaps = [g for o in run.outputs for g in token_gaps(o.token_times)]
        return sum(g > TBT_SLO_MS / 1e3 for g in gaps) / len(gaps)

    assert late(runs["aggregated"][1]) > 0.1
    assert late(duet) < late(runs["aggregated"][1]) / 4
    assert ours["tbt_ms"]["p99"] < aggregated["tbt_ms"]["p99"]
    assert ours["slo_attainment"] > aggregated["slo_attainment"]


def test_lone_requests_take_exactly_the_latency_models_time():
    engine = make_engine("aggregated")
    model = make_engine("duet").policy.model
    specs = [RequestSpec(0.5, 1000, 4), RequestSpec(30.0, 500, 3)]  # far apart: the engine idles in between
    run = run_workload(engine, specs)
    for spec, out in zip(specs, run.outputs):
        assert out.arrival_time == run.start_time + spec.arrival_time
        assert out.ttft == pytest.approx(model.step_time([(spec.input_len, 0)], 132), rel=1e-9)
        expected = [model.step_time([(1, spec.input_len + i)], 132) for i in range(spec.output_len - 1)]
        assert token_gaps(out.token_times) == pytest.approx(expected, rel=1e-9)
    assert len(run.steps) == sum(s.output_len for s in specs)


class FakeTime:
    """The host clock the real backend and the driver read, advanced 1 ms per reading and jumped by sleep()."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        self.now += 1e-3
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wall_clock_driver_waits_for_arrivals(tmp_path, monkeypatch):
    from minidu import model_runner
    from minidu.benchmarks import serving
    from tests.models.checkpoints import write_checkpoint

    fake = FakeTime()
    monkeypatch.setattr(model_runner, "time", fake)
    monkeypatch.setattr(serving, "time", fake)
    write_checkpoint(tmp_path, "LlamaForCausalLM")
    engine = minidu.Engine(str(tmp_path), num_kv_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    specs = [RequestSpec(0.0, 5, 2), RequestSpec(1.0, 3, 2)]
    run = run_workload(engine, specs)
    late = run.outputs[1]
    assert late.arrival_time == run.start_time + 1.0
    assert late.first_token_time > late.arrival_time
    assert run.outputs[0].token_times[-1] < late.arrival_time  # so the engine idled before the second request
    assert [len(o.token_ids) for o in run.outputs] == [2, 2]
    assert any(s.start >= 1.0 for s in run.steps) and all(s.end <= 1.0 or s.start >= 1.0 for s in run.steps)


def test_runs_are_deterministic(runs):
    engine = make_engine("duet")
    again = run_workload(engine, SPECS, seed=1)
    assert [o.token_times for o in again.outputs] == [o.token_times for o in runs["duet"][1].outputs]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in runs["duet"][1].outputs]


def test_timeline_is_json_and_relative_to_start(runs):
    _, run = runs["duet"]
    data = json.loads(json.dumps(timeline(run, {"policy": "duet"})))
    assert len(data["steps"]) == len(run.steps) and len(data["requests"]) == len(SPECS)
    assert data["requests"][3]["arrival"] == pytest.approx(SPECS[3].arrival_time)
    assert {s["mode"] for s in data["steps"]} == {"aggregated", "multiplexed"}


def run_script(monkeypatch, name: str, *argv: str):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setattr(sys, "argv", [name, *argv])
    module = __import__(name)
    module.main()


def test_bench_serving_and_plot_timeline_scripts(monkeypatch, tmp_path, capsys):
    out, tl = tmp_path / "r.json", tmp_path / "t.json"
    run_script(monkeypatch, "bench_serving", "--backend", "sim", "--model", "qwen3-8b", "--gpu", "h200", "--policy",
               "duet", "--workload", "azure-code", "--rate", "20", "--num-requests", "30", "--tbt-slo-ms", "50",
               "--out", str(out), "--timeline", str(tl), "--no-progress")
    m = json.loads(out.read_text())
    for key in ("policy", "workload", "rate", "num_requests", "duration_s", "throughput_req_s", "output_tok_s",
                "slo_attainment", "goodput_req_s"):
        assert key in m
    assert set(m["ttft_ms"]) == set(m["tbt_ms"]) == {"mean", "p50", "p90", "p99"}
    assert (m["policy"], m["workload"], m["rate"], m["num_requests"]) == ("duet", "azure-code", 20.0, 30)
    assert "SLO attainment" in capsys.readouterr().out
    # The simulator's ground truth is the planner's model here: every step kind is predicted without error.
    run_script(monkeypatch, "model_error", str(tl), "--out", str(tmp_path / "e.json"))
    errors = json.loads((tmp_path / "e.json").read_text())
    assert errors["aggregated"]["num_steps"] > 0 and errors["multiplexed decode"]["num_steps"] > 0
    assert all(e is None or e["p90"] < 1e-9 for e in errors.values())
    assert "multiplexed prefill" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    run_script(monkeypatch, "plot_timeline", str(tl), "--out", str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_bench_serving_refuses_requests_longer_than_max_model_len(monkeypatch):
    with pytest.raises(SystemExit, match=r"5/5 requests need more than max_model_len=40960"):
        run_script(monkeypatch, "bench_serving", "--backend", "sim", "--model", "qwen3-8b", "--workload", "fixed",
                   "--input-len", "50000", "--output-len", "8", "--num-requests", "5", "--no-progress")


def test_sweep_capacity_brackets_the_target(monkeypatch, tmp_path):
    out, md = tmp_path / "s.json", tmp_path / "t.md"
    run_script(monkeypatch, "sweep_capacity", "--workloads", "azure-code", "--tbt-slo-ms", "50", "--budgets", "2048",
               "--duet-budgets", "8192", "--others", "--num-requests", "60", "--tolerance", "0.3", "--out", str(out),
               "--table", str(md))
    results = json.loads(out.read_text())["results"]
    assert [(r["policy"], r["budget"]) for r in results] == [("aggregated", 2048), ("duet", 8192)]
    for result in results:
        probes = result["probes"]
        assert all(p["passes"] == (p["tracks_rate"] and p["slo_attainment"] >= 0.9) for p in probes)
        passed = [p["rate"] for p in probes if p["passes"]]
        failed = [p["rate"] for p in probes if not p["passes"]]
        assert result["capacity_req_s"] == max(passed, default=0.0)
        assert min(r for r in failed if r > result["capacity_req_s"]) <= result["capacity_req_s"] / 0.7 + 1e-9
    aggregated, duet = (r["capacity_req_s"] for r in results)
    ratio = f"{duet / aggregated:.2f}" if aggregated else "-"
    assert md.read_text().splitlines()[2].endswith(f"| {ratio} |")


def test_recorded_predictions_are_the_planners_and_durations_the_ground_truths():
    # The simulated GPU pays 50 us more per layer than the planner's model: an aggregated step then lasts exactly
    # 36 layers * 50 us longer than predicted, whatever its batch, and every recorded part says the same.
    engine = make_engine("duet")
    hw = engine.latency_model.hw
    use_ground_truth(engine, with_physics(hw, layer_overhead=hw.layer_overhead + 50e-6))
    run = run_workload(engine, SPECS[:8], seed=1)
    aggregated = [s for s in run.steps if s.mode == "aggregated"]
    assert aggregated and len(aggregated) < len(run.steps)
    for s in aggregated:
        assert s.end - s.start - s.predicted == pytest.approx(36 * 50e-6, rel=1e-6)
        ((kind, num_sms, predicted, measured),) = s.parts
        assert (kind, num_sms, predicted) == ("aggregated", 132, s.predicted)
        assert measured == pytest.approx(s.end - s.start, rel=1e-12)
    for s in run.steps:
        if s.mode == "multiplexed":
            assert s.end - s.start > s.predicted
            assert {kind for kind, *_ in s.parts} <= {"prefill", "decode"}


# A simulated GPU on which multiplexing costs more than the planner's preset assumes: decode beside prefill 30%
# slower (the planner expects 10%) and 500 us per period (it expects 150 us).
CONTENDED = dict(corun_decode_slowdown=0.3, period_overhead=500e-6)


def contended_attainment(policy: str, adaptive: bool, specs, tbt_slo_ms: float) -> float:
    engine = minidu.Engine("qwen3-8b", backend="sim", hardware="h200", policy=policy, tbt_slo_ms=tbt_slo_ms,
                           max_num_batched_tokens=BUDGET)
    use_ground_truth(engine, with_physics(engine.latency_model.hw, **CONTENDED))
    if policy == "duet" and not adaptive:
        engine.policy.correction, engine.policy.margin = None, 0.0
    run = run_workload(engine, specs, seed=1)
    m = serving_metrics(run.outputs, [s.mode for s in run.steps], ttft_slo_ms=TTFT_SLO_MS, tbt_slo_ms=tbt_slo_ms)
    return m["slo_attainment"]


def test_adaptive_planner_keeps_the_objective_when_the_model_is_optimistic():
    specs = synthetic_workload("azure-code", 100, 20.0, seed=0)
    fixed = contended_attainment("duet", False, specs, 25.0)
    adaptive = contended_attainment("duet", True, specs, 25.0)
    aggregated = contended_attainment("aggregated", False, specs, 25.0)
    assert fixed < 0.9 <= adaptive
    assert adaptive >= aggregated
