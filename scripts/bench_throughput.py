"""Offline throughput, as nano-vllm's bench measures it: 256 requests with input and output lengths uniform in
[100, 1024], ignore_eos, one warm-up; prints output tokens/s.

    python scripts/bench_throughput.py --model qwen3-0.6b            # preset: dummy weights
    python scripts/bench_throughput.py --model qwen3-0.6b --hf       # also Hugging Face transformers' generate
"""
import argparse
import json
import random
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf", action="store_true", help="also time transformers' generate on the same requests")
    p.add_argument("--out", default=None, help="append the result as a JSON line to this file")
    return p.parse_args()


def make_requests(args, vocab: int):
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(args.min_len, args.max_len))]
               for _ in range(args.num_seqs)]
    outputs = [rng.randint(args.min_len, args.max_len) for _ in range(args.num_seqs)]
    return prompts, outputs


def bench_minidu(args, prompts, outputs) -> dict:
    import minidu

    engine = minidu.Engine(args.model, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
                           max_model_len=args.max_len * 2 + 8)
    params = [minidu.SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in outputs]
    engine.generate([[1, 2, 3]], minidu.SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return {"engine": "minidu", "output_tok_s": sum(outputs) / elapsed, "seconds": elapsed}


def bench_hf(args, prompts, outputs) -> dict:
    """transformers' generate, one request at a time (its static batching would pad to the longest)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from minidu.models.presets import MODEL_PRESETS

    config = AutoConfig.for_model(**MODEL_PRESETS[args.model]) if args.model in MODEL_PRESETS else AutoConfig.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=getattr(torch, args.dtype)).cuda().eval()
    start = time.perf_counter()
    for prompt, n in zip(prompts, outputs):
        ids = torch.tensor([prompt], device="cuda")
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    elapsed = time.perf_counter() - start
    return {"engine": "transformers", "output_tok_s": sum(outputs) / elapsed, "seconds": elapsed}


def main():
    args = parse_args()
    from minidu.models.loader import resolve_model

    vocab = resolve_model(args.model, "dummy")[1].vocab_size
    prompts, outputs = make_requests(args, vocab)
    results = [bench_minidu(args, prompts, outputs)]
    if args.hf:
        results.append(bench_hf(args, prompts, outputs))
    for r in results:
        r |= {"model": args.model, "num_seqs": args.num_seqs, "output_tokens": sum(outputs)}
        print(f"{r['engine']:>12}: {r['output_tokens']} output tokens in {r['seconds']:.2f} s = "
              f"{r['output_tok_s']:.1f} tok/s")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
