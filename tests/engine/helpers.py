"""Shared pieces of the engine tests: a small engine over a tiny checkpoint, stepping it to completion, a chat
template, a policy that always multiplexes and a GPU profile slow enough to make duet split."""
import minidu
from minidu.scheduler.hardware import HardwareProfile
from minidu.scheduler.plan import MultiplexedPlan, Plan

# A chat template in the Hugging Face style: one bos, each turn ended by eos, the assistant's turn opened on request.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_engine(path, **kwargs) -> minidu.Engine:
    """An engine over the checkpoint at `path` with a small KV pool and batch, `kwargs` overriding."""
    settings = dict(num_kv_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64) | kwargs
    return minidu.Engine(str(path), **settings)


def run_steps(engine: minidu.Engine, prompts: list, params) -> tuple[list[list[int]], list[Plan]]:
    """Adds `prompts` (one SamplingParams for all, or one each) and steps until nothing is left: their token ids in
    prompt order, and the plan of every step."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    plans, done = [], {}
    while engine.has_unfinished_requests():
        result = engine.step()
        done |= {o.request_id: o.token_ids for o in result.outputs if o.finished}
        plans.append(result.plan)
    return [done[i] for i in ids], plans


def write_slow_profile(path) -> str:
    """A deliberately slow 16-SM GPU (with an interconnect, for tensor parallelism): the tiny models' mixed steps
    break a 0.5 ms objective that split decode steps meet, so duet emits multiplexed plans with look-ahead."""
    path.write_text(HardwareProfile("slow-gpu", 16, 2e9, 2e9, 4, 0.0, interconnect_bandwidth=1e9,
                                    interconnect_latency=1e-6).to_json())
    return str(path)


class LookaheadPolicy:
    """Always multiplexed: prefill on 3 programs, k decode steps on 5 (engines running it on CUDA graphs need
    decode_sms_choices=(5,))."""

    name = "test-lookahead"

    def __init__(self, k: int):
        self.k = k

    def plan(self, scheduler):
        proposal = scheduler.propose()
        prefill, decode = proposal.split()
        return MultiplexedPlan(prefill, 3, decode, 5, self.k, preempt=proposal.preempt)
