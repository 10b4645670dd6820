"""Replays a workload against an Engine as an online server sees it: each request is added once the engine's clock
reaches its arrival time (the simulated clock jumps to it, the host clock is waited on), and every step is recorded."""
import time
from collections import deque
from dataclasses import asdict, dataclass

from minidu.engine import Engine
from minidu.outputs import RequestOutput, StepResult
from minidu.sampling_params import SamplingParams
from minidu.scheduler.hardware import HardwareProfile
from minidu.scheduler.plan import AggregatedPlan
from minidu.scheduler.roofline import LatencyModel
from minidu.benchmarks.workloads import RequestSpec, prompt_token_ids


@dataclass(slots=True)
class StepRecord:
    """One engine step, times in seconds from the start of the run. Aggregated steps share `num_sms` SMs between
    prefill and decode (the split fields are None); multiplexed ones run k decode steps beside one prefill step."""

    start: float
    end: float
    mode: str
    num_sms: int
    num_sms_prefill: int | None
    num_sms_decode: int | None
    k: int
    prefill_tokens: int
    decode_tokens: int
    predicted: float | None = None  # the latency model's step time, when the engine has one
    # (kind, SM budget, predicted s, measured s) of the parts the step's token times reveal (plan.measured_parts):
    # kind "aggregated", or "prefill" / "decode" of a multiplexed step
    parts: list[tuple[str, int, float, float]] | None = None


@dataclass(slots=True)
class ServingRun:
    outputs: list[RequestOutput]  # one per spec, in spec order, times on the engine clock
    steps: list[StepRecord]
    start_time: float  # engine clock at the start of the run; spec i arrived at start_time + arrival_time


def step_record(result: StepResult, t0: float) -> StepRecord:
    """The record of an executed step, times relative to `t0`."""
    plan = result.plan
    start, end = result.start - t0, result.end - t0
    parts = [(p.kind, p.num_sms, p.predicted, p.measured) for p in result.parts] if result.parts else None
    if isinstance(plan, AggregatedPlan):
        num_decode = sum(c.is_decode for c in plan.chunks)
        return StepRecord(start, end, "aggregated", plan.num_sms or result.num_sms, None, None, 1,
                          plan.num_tokens - num_decode, num_decode, result.predicted_time, parts)
    return StepRecord(start, end, "multiplexed", plan.num_sms_prefill + plan.num_sms_decode, plan.num_sms_prefill,
                      plan.num_sms_decode, plan.k, sum(c.num_new_tokens for c in plan.prefill),
                      plan.k * len(plan.decode), result.predicted_time, parts)


def use_ground_truth(engine: Engine, hw: HardwareProfile) -> None:
    """Makes a simulated engine's steps take the times `hw` gives them while its policy keeps planning with its own
    latency model: the simulator's ground truth then differs from the planner's (contention, slowdowns, overheads)."""
    if engine.config.backend != "sim" or engine.latency_model is None:
        raise ValueError("a ground truth applies only to the sim backend")
    engine.executor.model = LatencyModel(engine.latency_model.shape, hw)


def run_workload(engine: Engine, specs: list[RequestSpec], *, seed: int = 0, progress: bool = False) -> ServingRun:
    """Serves `specs` on `engine` until all finish. Prompts are random ids from `seed` and request i gets id str(i);
    every request generates exactly its output_len tokens (ignore_eos)."""
    if not specs:
        raise ValueError("specs is empty")
    from tqdm.auto import tqdm

    sim = engine.config.backend == "sim"
    vocab = engine.model_config.vocab_size
    pending = deque(sorted(range(len(specs)), key=lambda i: specs[i].arrival_time))
    start = engine.clock()
    done: dict[str, RequestOutput] = {}
    steps: list[StepRecord] = []
    with tqdm(total=len(specs), desc=engine.config.policy, unit="req", disable=not progress) as bar:
        while pending or engine.has_unfinished_requests():
            while pending and start + specs[pending[0]].arrival_time <= engine.clock():
                _add(engine, specs, pending.popleft(), start, vocab, seed)
            if not engine.has_unfinished_requests():
                _wait_until(engine, start + specs[pending[0]].arrival_time, sim)
                continue
            result = engine.step()
            if result.plan is not None:
                if result.plan.num_tokens == 0 and not result.outputs:
                    raise RuntimeError(f"the engine scheduled nothing with {len(specs) - len(done)} requests "
                                       f"unfinished (KV cache too small for the waiting prompts?)")
                steps.append(step_record(result, start))
            for out in result.outputs:
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
    return ServingRun([done[str(i)] for i in range(len(specs))], steps, start)


def _add(engine: Engine, specs: list[RequestSpec], i: int, start: float, vocab: int, seed: int) -> None:
    spec = specs[i]
    params = SamplingParams(max_tokens=spec.output_len, ignore_eos=True, seed=seed + i)
    engine.add_request(prompt_token_ids(spec.input_len, vocab, seed, i), params, request_id=str(i),
                       arrival_time=start + spec.arrival_time)


def _wait_until(engine: Engine, t: float, sim: bool) -> None:
    if sim:
        engine.executor.advance_to(t)
    else:
        time.sleep(max(0.0, t - engine.clock()))


def timeline(run: ServingRun, meta: dict) -> dict:
    """A JSON-ready record of the run for plots: `meta`, every step, and each request's arrival and token times, all
    in seconds from the start of the run."""
    def rel(t: float | None) -> float | None:
        return None if t is None else t - run.start_time

    requests = [{"id": o.request_id, "arrival": rel(o.arrival_time), "first_token": rel(o.first_token_time),
                 "token_times": [t - run.start_time for t in o.token_times]} for o in run.outputs]
    return {"meta": meta, "steps": [asdict(s) for s in run.steps], "requests": requests}
