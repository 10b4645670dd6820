"""The parts of scripts/gpu_check.py, each run in its own child process: `part_<name>(ctx)` measures and calls
`ctx.save(...)` with what it has so far (a `summary` line for the table included), so a part stopped at its time
budget still reports."""
from minidu.kernels.platform import INTERPRET  # noqa: F401, I001  (before triton: the interpreter switch)

import gc
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

import bench_kernels as bk

ROOT = Path(__file__).resolve().parents[1]
ISOLATION_DECODE_SMS = (16, 32, 64)  # decode budgets of the isolation part, the GEMM taking the rest
QWEN3_8B_HEADS = (32, 8, 128)  # query heads, kv heads, head_dim


# ---- 1. the test suite on this device ----

def part_pytest(ctx) -> None:
    """The suite on CUDA (bf16 tests, graphs, multiplexing), pass/fail counts even when stopped early."""
    targets = (["tests/kernels/test_gather.py::test_bad_inputs_name_the_argument"] if ctx.dry else
               ["tests/kernels", "tests/engine", "tests/models", "tests/scheduler", "tests/server"])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
           "--ignore=tests/kernels/test_aot_compile.py", *targets]
    timed_out = False
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10.0, ctx.time_left() - 5))
        output = proc.stdout
    except subprocess.TimeoutExpired as e:
        output, timed_out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), True
    counts = pytest_counts(output)
    failed = re.findall(r"^FAILED (\S+)", output, re.M)
    ctx.save(counts=counts, timed_out=timed_out, failed_tests=failed[:50], tail=output[-3000:],
             summary=", ".join(f"{n} {k}" for k, n in counts.items()) + (" (stopped at its time limit)" if timed_out
                                                                        else ""))


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line, or from its progress characters when it was stopped before it."""
    summary = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", output.splitlines()[-1]
                         if output.strip() else "")
    if summary:
        return {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in summary}
    progress = "".join(line.split(" [")[0] for line in output.splitlines()
                       if re.fullmatch(r"[.FEsxX]+( +\[ *\d+%\])?", line))
    return {k: progress.count(c) for k, c in (("passed", "."), ("failed", "F"), ("error", "E"), ("skipped", "s"))}


# ---- 2. every kernel: bitwise across budgets, close to a float32 reference ----

def kernel_cases(ctx) -> list:
    d, dev = ctx.dtype, ctx.device
    if ctx.dry:
        heads = (4, 2, 16)
        return [bk.gemm_case("tiny", 3, 24, 40, d, dev), bk.decode_case(2, 37, heads, d, dev),
                bk.prefill_case(21, heads, d, dev), bk.rmsnorm_case(3, 64, d, dev), bk.silu_case(3, 48, d, dev),
                bk.rotary_case(3, heads, d, dev), bk.store_case(5, heads, d, dev),
                bk.embedding_case(4, 100, 64, d, dev), bk.sampling_case(2, 300, d, dev)]
    h = QWEN3_8B_HEADS
    return [bk.gemm_case("qwen3-8b.qkv", 1, 4096, 6144, d, dev),
            bk.gemm_case("qwen3-8b.gate_up", 64, 4096, 24576, d, dev),
            bk.gemm_case("qwen3-8b.down", 2048, 12288, 4096, d, dev), bk.decode_case(16, 4096, h, d, dev),
            bk.decode_case(3, 300, h, d, dev), bk.prefill_case(1024, h, d, dev), bk.rmsnorm_case(256, 4096, d, dev),
            bk.silu_case(256, 12288, d, dev), bk.rotary_case(256, h, d, dev), bk.store_case(256, h, d, dev),
            bk.embedding_case(256, 151936, 4096, d, dev), bk.sampling_case(64, 151936, d, dev)]


def _snapshot(args: dict, returned) -> list[torch.Tensor]:
    """Every tensor a run may have written (in-place kernels write their inputs), and what it returned."""
    tensors = [t for v in args.values() for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor)]
    returned = returned if isinstance(returned, (tuple, list)) else [returned]
    return [t.clone() for t in tensors + [r for r in returned if isinstance(r, torch.Tensor)]]


def _run_on_budget(case, budget: int) -> list[torch.Tensor]:
    torch.manual_seed(0)  # the same inputs for every budget
    args = case.make()
    return _snapshot(args, case.run(args, budget))


def part_kernels(ctx) -> None:
    rows = []
    for case in kernel_cases(ctx):
        row = {"family": case.family, "shape": case.shape, "budgets": list(ctx.budgets)}
        try:
            case.check(case.make())
            row["close_to_fp32_reference"] = True
            first = _run_on_budget(case, ctx.budgets[0])
            row["bitwise_equal_across_budgets"] = all(
                all(torch.equal(a, b) for a, b in zip(first, _run_on_budget(case, s))) for s in ctx.budgets[1:])
        except AssertionError as e:
            row.update(close_to_fp32_reference=False, error=str(e)[:500])
        except Exception as e:  # noqa: BLE001  (a launch failure is a result here, e.g. out of shared memory)
            row.update(error=f"{type(e).__name__}: {str(e)[:500]}")
        rows.append(row)
        ok = sum(r.get("bitwise_equal_across_budgets", False) and r.get("close_to_fp32_reference", False) for r in rows)
        ctx.save(rows=rows, summary=f"{ok}/{len(rows)} kernels close to fp32 torch and bitwise equal over budgets "
                                    f"{list(ctx.budgets)} ({ctx.dtype})")


# ---- 3. engine tokens across plans ----

TINY_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 128, "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": True, "torch_dtype": "float32", "eos_token_id": 1}


def engine_setup(ctx, tmp: Path) -> tuple[str, dict, dict]:
    """(model, common engine options, duet/static options): a Qwen3-0.6B-shaped model with random weights on the GPU,
    a tiny one on a deliberately slow 16-SM profile in a dry run (so that duet still splits)."""
    if not ctx.dry:
        return "qwen3-0.6b", dict(load_format="dummy", num_kv_blocks=2048, max_model_len=4096, max_num_seqs=16,
                                  max_num_batched_tokens=512), dict(hardware="h200", tbt_slo_ms=1.5)
    from minidu.scheduler.hardware import HardwareProfile

    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text(json.dumps(TINY_QWEN3))
    (tmp / "slow.json").write_text(HardwareProfile("slow-gpu", 16, 2e9, 2e9, 4, 0.0).to_json())
    return str(tmp / "model"), dict(load_format="dummy", num_kv_blocks=64, block_size=4, max_num_seqs=4,
                                    max_num_batched_tokens=8), dict(hardware=str(tmp / "slow.json"), tbt_slo_ms=0.5)


def generate(model: str, prompts: list[list[int]], max_tokens: int, **options) -> dict:
    """Greedy tokens of every prompt under one engine configuration, with how its steps were planned."""
    import minidu
    from minidu.scheduler.plan import MultiplexedPlan

    engine = minidu.Engine(model, seed=0, **options)
    params = minidu.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done, plans = {}, []
    while engine.has_unfinished_requests():
        result = engine.step()
        plans.append(result.plan)
        done |= {o.request_id: o.token_ids for o in result.outputs if o.finished}
    split = [p for p in plans if isinstance(p, MultiplexedPlan)]
    graphs = getattr(engine.executor, "graph_capture", None)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"tokens": [done[i] for i in ids], "steps": len(plans), "multiplexed_steps": len(split),
            "max_k": max([p.k for p in split], default=1), "decode_budgets": sorted({p.num_sms_decode for p in split}),
            "graph_capture": graphs}


def part_engine(ctx) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model, common, split = engine_setup(ctx, Path(tmp))
        lengths = (9, 2, 13) if ctx.dry else (1500, 40, 700, 9, 1200, 300, 2000, 60)
        prompts = [[(7 * i + 3 * j) % 100 + 2 for j in range(n)] for i, n in enumerate(lengths)]
        max_tokens = 3 if ctx.dry else 24
        configs = {"aggregated": dict(policy="aggregated"), "eager": dict(policy="aggregated", enforce_eager=True),
                   "duet": dict(policy="duet", **split), "duet-eager": dict(policy="duet", enforce_eager=True, **split),
                   "static": dict(policy="static", hardware=split["hardware"])}
        runs = {}
        for name, options in configs.items():
            try:
                runs[name] = generate(model, prompts, max_tokens, **common, **options)
            except Exception as e:  # noqa: BLE001  (reported: the other configurations still run)
                runs[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            reference = runs.get("aggregated", {}).get("tokens")
            for run in runs.values():
                if "tokens" in run:
                    run["identical_to_aggregated"] = run["tokens"] == reference
            same = [n for n, r in runs.items() if r.get("identical_to_aggregated")]
            ctx.save(runs=runs, summary=f"identical greedy tokens: {same} of {list(runs)}; duet max k "
                                        f"{runs.get('duet', {}).get('max_k')}")


# ---- 4. speed against PyTorch and the roofline ----

def timer(ctx):
    """ms of one call: CUDA graphs and triton's do_bench on a GPU; one host-timed call in a dry run."""
    if not ctx.dry:
        return lambda run, arg_sets: bk.time_ms(run, arg_sets, use_graph=True)

    def host(run, arg_sets):
        start = time.perf_counter()
        run(arg_sets[0])
        return 1e3 * (time.perf_counter() - start)
    return host


def _arg_sets(ctx, case) -> list[dict]:
    first = case.make()
    return [first] + ([] if ctx.dry else [case.make() for _ in range(bk.rotation(bk.set_size(first)) - 1)])


def copy_bandwidth(ctx) -> float:
    """Bytes per second of a device-to-device copy (read + write) of a buffer far larger than L2."""
    n = (1 << 20) if ctx.dry else (1 << 30)
    src, dst = (torch.empty(n, dtype=torch.uint8, device=ctx.device) for _ in range(2))
    ms = timer(ctx)(lambda a: dst.copy_(src), [{}])
    return 2 * n / (ms / 1e3)


def part_perf(ctx) -> None:
    time_ms, d, dev = timer(ctx), ctx.dtype, ctx.device
    out = {"copy_bandwidth_gb_s": copy_bandwidth(ctx) / 1e9}
    ctx.save(**out)
    gemms = [bk.gemm_case("tiny", 64, 64, 96, d, dev)] if ctx.dry else [
        bk.gemm_case(f"qwen3-8b.{name}", m, k, n, d, dev) for name, k, n in bk.PROJECTIONS["qwen3-8b"]
        for m in (1, 64, 2048, 8192)]
    budgets = (1,) if ctx.dry else tuple(b for b in (132, 66, 16) if b <= ctx.num_sms)
    out["gemm"] = []
    for case in gemms:
        sets = _arg_sets(ctx, case)
        torch_ms = time_ms(case.torch_run, sets)
        for s in budgets:
            ms = time_ms(lambda a, s=s: case.run(a, s), sets)
            out["gemm"].append(dict(shape=case.shape, num_sms=s, ms=ms, torch_ms=torch_ms, vs_torch=ms / torch_ms,
                                    tflops=case.flops / ms / 1e9))
        ctx.save(**out)
    decodes = [bk.decode_case(2, 37, (4, 2, 16), d, dev)] if ctx.dry else [
        bk.decode_case(b, c, QWEN3_8B_HEADS, d, dev) for b in (1, 16, 64, 256) for c in (1024, 8192, 32768)
        if b * c <= bk.MAX_DECODE_TOKENS]
    out["decode"] = []
    for case in decodes:
        ms = time_ms(lambda a: case.run(a, None), _arg_sets(ctx, case))
        gb_s = case.bytes / ms / 1e6
        out["decode"].append(dict(shape=case.shape, ms=ms, gb_s=gb_s, of_copy=gb_s / out["copy_bandwidth_gb_s"]))
        ctx.save(**out)
    prefills = [bk.prefill_case(21, (4, 2, 16), d, dev)] if ctx.dry else [
        bk.prefill_case(t, QWEN3_8B_HEADS, d, dev) for t in (1024, 4096)]
    out["prefill"] = []
    for case in prefills:
        sets = _arg_sets(ctx, case)
        ms, sdpa_ms = time_ms(lambda a: case.run(a, None), sets), time_ms(case.torch_run, sets)
        out["prefill"].append(dict(shape=case.shape, ms=ms, sdpa_ms=sdpa_ms, vs_sdpa=ms / sdpa_ms))
        ctx.save(**out)
    gemm_ratio = statistics.median(r["vs_torch"] for r in out["gemm"] if r["num_sms"] == budgets[0])
    ctx.save(**out, summary=f"GEMM median {gemm_ratio:.2f}x torch.matmul time; decode best "
                            f"{max(r['of_copy'] for r in out['decode']):.0%} of copy bandwidth; prefill "
                            f"{statistics.median(r['vs_sdpa'] for r in out['prefill']):.2f}x SDPA time")


# ---- 5. spatial isolation: budgets, green contexts, and where programs really ran ----

@triton.jit
def _smid_probe_kernel(
    out_ptr,  # [num_programs, 3] int64: SM id, start and end of the program on the global timer (ns)
    spin_ns,
):
    pid = tl.program_id(0)
    smid = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid], dtype=tl.int32, is_pure=False, pack=1)
    start = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=tl.int64, is_pure=False,
                                      pack=1)
    now = start
    # Spinning keeps every program resident long enough for the other grid's programs to be placed beside it.
    while now - start < spin_ns:
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=tl.int64, is_pure=False,
                                        pack=1)
    tl.store(out_ptr + pid * 3, smid.to(tl.int64))
    tl.store(out_ptr + pid * 3 + 1, start)
    tl.store(out_ptr + pid * 3 + 2, now)


def smid_probe(grid_a: int, grid_b: int, streams: tuple, spin_ns: int = 200_000) -> dict:
    """Two persistent-style grids launched at once on two streams: which SMs each grid's programs ran on."""
    bufs = [torch.zeros(g, 3, dtype=torch.int64, device="cuda") for g in (grid_a, grid_b)]
    torch.cuda.synchronize()
    for buf, stream in zip(bufs, streams):
        with torch.cuda.stream(stream):
            _smid_probe_kernel[(buf.shape[0],)](buf, spin_ns)
    torch.cuda.synchronize()
    a, b = ({int(s) for s in buf[:, 0].tolist()} for buf in bufs)
    overlap_ns = min(int(bufs[0][:, 2].max()), int(bufs[1][:, 2].max())) - max(int(bufs[0][:, 1].min()),
                                                                                 int(bufs[1][:, 1].min()))
    return {"programs": [grid_a, grid_b], "sms_used": [len(a), len(b)], "shared_sms": len(a & b),
            "ran_concurrently": overlap_ns > 0}


def green_streams(num_sms: list[int]) -> tuple[list | None, str | None]:
    """A stream on a green context of each SM count, or (None, why not)."""
    gc_module = getattr(torch.cuda, "green_contexts", None)
    if gc_module is None:
        return None, f"torch {torch.__version__} has no torch.cuda.green_contexts"
    try:
        streams = []
        for n in num_sms:
            ctx = gc_module.GreenContext.create(num_sms=n)
            if hasattr(ctx, "Stream"):
                streams.append(ctx.Stream())
            else:  # older torch: a stream made while the green context is current belongs to it
                ctx.set_context()
                streams.append(torch.cuda.Stream())
                ctx.pop_context()
        return streams, None
    except Exception as e:  # noqa: BLE001  (reported: the driver or torch may not support them)
        return None, f"{type(e).__name__}: {str(e)[:300]}"


def part_isolation(ctx) -> None:
    total = ctx.num_sms
    dec = bk.decode_case(64, 4096, QWEN3_8B_HEADS, ctx.dtype, "cuda")
    mm = bk.gemm_case("qwen3-8b.gate_up", 8192, 4096, 24576, ctx.dtype, "cuda")
    dec_args, mm_args = dec.make(), mm.make()
    rows = []
    for s_d in ISOLATION_DECODE_SMS:
        row = {"decode_sms": s_d, "gemm_sms": total - s_d}
        row["probe_budget_streams"] = smid_probe(s_d, total - s_d, (torch.cuda.Stream(), torch.cuda.Stream()))
        alone = bk.time_ms(lambda a: dec.run(a, s_d), [dec_args], use_graph=False)
        gemm_ms = bk.time_ms(lambda a: mm.run(a, total - s_d), [mm_args], use_graph=False)
        reps = 50
        gemm_reps = max(1, math.ceil(3 * reps * alone / gemm_ms))
        beside = statistics.median(bk.concurrent_decode_ms(
            lambda: dec.run(dec_args, s_d), lambda: [mm.run(mm_args, total - s_d) for _ in range(gemm_reps)], reps)
            for _ in range(3))
        row |= {"decode_alone_ms": alone, "decode_beside_gemm_ms": beside, "slowdown": beside / alone}
        streams, why = green_streams([s_d, total - s_d])
        if streams is None:
            row["green_context"] = why
        else:
            try:
                row["probe_green_contexts"] = smid_probe(s_d, total - s_d, tuple(streams))
                green = green_concurrent_ms(dec, dec_args, mm, mm_args, s_d, total, gemm_reps, reps, streams)
                row |= {"green_decode_beside_gemm_ms": green, "green_slowdown": green / alone}
            except Exception as e:  # noqa: BLE001  (reported: launching on green-context streams may be unsupported)
                row["green_context"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        ctx.save(rows=rows, summary="; ".join(
            f"S_d={r['decode_sms']}: {r['slowdown']:.2f}x beside GEMM, {r['probe_budget_streams']['shared_sms']} "
            f"SMs shared" for r in rows))


def green_concurrent_ms(dec, dec_args, mm, mm_args, s_d, total, gemm_reps, reps, streams) -> float:
    """ms per decode call on a green context of s_d SMs while the GEMM runs on one of the other SMs."""
    decode_stream, gemm_stream = streams
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    with torch.cuda.stream(gemm_stream):
        for _ in range(gemm_reps):
            mm.run(mm_args, total - s_d)
    with torch.cuda.stream(decode_stream):
        start.record()
        for _ in range(reps):
            dec.run(dec_args, s_d)
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


# ---- 6. a short serving run and the latency model's error ----

def part_serving(ctx) -> None:
    import minidu
    from minidu.benchmarks.metrics import serving_metrics
    from minidu.benchmarks.serving import run_workload
    from minidu.benchmarks.workloads import synthetic_workload

    with tempfile.TemporaryDirectory() as tmp:
        if ctx.dry:
            model, common, split = engine_setup(ctx, Path(tmp))
            specs = synthetic_workload("fixed", 3, 1000.0, input_len=10, output_len=3)
        else:
            model, common, split = "qwen3-8b", dict(load_format="dummy", max_num_seqs=64, max_model_len=8192), \
                dict(hardware="h200", tbt_slo_ms=50.0)
            specs = synthetic_workload("azure-conv", 40, 6.0, seed=0)
        results = {}
        for policy in ("aggregated", "duet"):
            engine = minidu.Engine(model, policy=policy, **common, **({"tbt_slo_ms": split["tbt_slo_ms"],
                                                                       "hardware": split["hardware"]}
                                                                      if policy == "duet" else
                                                                      {"hardware": split["hardware"]}))
            kv_blocks, graphs = engine.scheduler.block_manager.num_blocks, engine.executor.graph_capture
            run = run_workload(engine, specs)
            results[policy] = serving_metrics(
                run.outputs, [s.mode for s in run.steps], ttft_slo_ms=2000.0, tbt_slo_ms=split["tbt_slo_ms"],
                policy=policy, step_durations=[s.end - s.start for s in run.steps],
                step_predictions=[s.predicted for s in run.steps])
            results[policy] |= {"kv_blocks": kv_blocks, "graph_capture": graphs}
            del engine, run
            gc.collect()
            ctx.save(results=results, summary="; ".join(
                f"{p}: goodput {m['goodput_req_s']:.2f} req/s, p90 TBT {_fmt(m['tbt_ms']['p90'])} ms, latency model "
                f"error median {_pct((m['latency_model_error'] or {}).get('median'))} p90 "
                f"{_pct((m['latency_model_error'] or {}).get('p90'))}" for p, m in results.items()))


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"
