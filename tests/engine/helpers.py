"""Shared pieces of the engine tests: a small engine over a tiny checkpoint, a chat template, and a policy that
always multiplexes."""
import minidu
from minidu.scheduler.plan import MultiplexedPlan

# A chat template in the Hugging Face style: one bos, each turn ended by eos, the assistant's turn opened on request.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_engine(path, **kwargs) -> minidu.Engine:
    """An engine over the checkpoint at `path` with a small KV pool and batch, `kwargs` overriding."""
    settings = dict(num_kv_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=64) | kwargs
    return minidu.Engine(str(path), **settings)


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
