"""Command line: `python -m minidu generate --model PATH_OR_PRESET --prompt "..."` continues a prompt;
`python -m minidu chat --model smollm2-135m "What is the capital of France?"` answers with the model's chat template;
`python -m minidu serve --model PATH_OR_PRESET` serves it over HTTP with the OpenAI API."""
import argparse
import logging
import sys

from minidu.sampling_params import SamplingParams


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory, preset name (random weights) or Hub repo id")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to shard the model over, one process each")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minidu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a continuation of a prompt, streaming tokens")
    _add_common(gen)
    gen.add_argument("--prompt", required=True, help="text, or comma-separated token ids for models without tokenizer")
    chat = sub.add_parser("chat", help="answer a message with the model's chat template, streaming tokens")
    _add_common(chat)
    chat.add_argument("message")
    chat.add_argument("--system", default=None, help="an optional system message")
    _add_serve(sub.add_parser("serve", help="serve the model with an OpenAI-compatible HTTP API (pip install "
                                            "-e '.[serve]')"))
    return parser.parse_args(argv)


def _add_serve(p: argparse.ArgumentParser) -> None:
    """The server's options and minidu.Engine's, under vLLM's names."""
    p.add_argument("--model", required=True, help="checkpoint directory, GGUF file, preset name or Hub repo id")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds requests in flight get to finish before they are aborted")
    for name, kind in (("dtype", str), ("device", str), ("block-size", int), ("num-kv-blocks", int),
                       ("gpu-memory-utilization", float), ("max-num-seqs", int), ("max-num-batched-tokens", int),
                       ("max-model-len", int), ("load-format", str), ("seed", int), ("policy", str),
                       ("tbt-slo-ms", float), ("backend", str), ("hardware", str), ("decode-sms", int),
                       ("tensor-parallel-size", int), ("distributed-timeout-s", float)):
        p.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS, help="as minidu.Engine's "
                       f"{name.replace('-', '_')}")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   default=argparse.SUPPRESS)
    p.add_argument("--enforce-eager", action="store_true", default=argparse.SUPPRESS, help="no CUDA graphs")


def serve(args: argparse.Namespace) -> None:
    from minidu.engine import Engine
    from minidu.server.app import serve as run_server

    options = {k: v for k, v in vars(args).items() if k not in (
        "command", "model", "served_model_name", "host", "port", "max_body_bytes", "shutdown_timeout")}
    try:
        engine = Engine(args.model, **options)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    run_server(engine, args.served_model_name or args.model, args.host, args.port, args.max_body_bytes,
               args.shutdown_timeout)


def _prompt(text: str):
    parts = text.split(",")
    if all(p.strip().isdigit() for p in parts):
        return [int(p) for p in parts]
    return text


def stream(engine, prompt, params: SamplingParams) -> None:
    """Prints a request's text (or token ids) as it is generated."""
    request_id = engine.add_request(prompt, params)
    printed = 0
    while engine.has_unfinished_requests():
        for out in engine.step().outputs:
            if out.request_id != request_id:
                continue
            if out.error:
                raise SystemExit(f"error: {out.error}")
            if engine.tokenizer is None:
                for t in out.new_token_ids:
                    print(t, end=" ", flush=True)
            else:
                print(out.text[printed:], end="", flush=True)
                printed = len(out.text)
            if out.finished:
                print(flush=True)
                print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        serve(args)
        return
    from minidu.engine import Engine

    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos)
        engine = Engine(args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                        enforce_eager=args.enforce_eager, max_num_seqs=8, max_num_batched_tokens=2048,
                        tensor_parallel_size=args.tensor_parallel_size)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    with engine:
        answer(engine, args, params)


def answer(engine, args: argparse.Namespace, params: SamplingParams) -> None:
    """Streams the continuation (generate) or the reply (chat) of the command line's prompt."""
    if args.command == "generate":
        stream(engine, _prompt(args.prompt), params)
        return
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.message}]
    try:
        prompt, params = engine.chat_request(messages, params)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    stream(engine, prompt, params)


if __name__ == "__main__":
    main()
