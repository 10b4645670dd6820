"""The wire form of a plan for the other tensor-parallel ranks: the same plan, each chunk's Sequence replaced by the
few fields the model runner reads, so a step's message grows with its new tokens and block tables, not with the
requests' whole histories."""
from dataclasses import dataclass

from minidu.scheduler.plan import AggregatedPlan, MultiplexedPlan, Plan, ScheduledChunk


@dataclass(frozen=True, slots=True)
class TokenWindow:
    """A sequence's token ids from `start` on, indexed by absolute position as `Sequence.token_ids` is."""

    start: int
    tokens: tuple[int, ...]

    def __getitem__(self, index: int | slice):
        if isinstance(index, slice):
            assert index.start >= self.start and index.step is None, "a window holds only the chunk's tokens"
            return self.tokens[index.start - self.start:index.stop - self.start]
        assert index >= self.start, "a window holds only the chunk's tokens"
        return self.tokens[index - self.start]


@dataclass(frozen=True, slots=True)
class ShippedParams:
    temperature: float
    top_k: int
    top_p: float


@dataclass(frozen=True, slots=True)
class ShippedSequence:
    """What ModelRunner reads of a Sequence (step_inputs.py): ids, this chunk's tokens, blocks and sampling state."""

    seq_id: int
    token_ids: TokenWindow
    block_table: tuple[int, ...]
    params: ShippedParams
    seed: int
    num_output_tokens: int


def _ship_chunk(c: ScheduledChunk) -> ScheduledChunk:
    seq, p = c.seq, c.seq.params
    window = TokenWindow(c.start, tuple(seq.token_ids[c.start:c.start + c.num_new_tokens]))
    shipped = ShippedSequence(seq.seq_id, window, tuple(seq.block_table), ShippedParams(p.temperature, p.top_k, p.top_p),
                              seq.seed, seq.num_output_tokens)
    return ScheduledChunk(shipped, c.start, c.num_new_tokens, c.samples, c.is_decode)


def ship_plan(plan: Plan) -> Plan:
    """The plan the other ranks execute: the same chunks, budgets and look-ahead, without preemptions (the scheduler's
    business, done on rank 0)."""
    if isinstance(plan, AggregatedPlan):
        return AggregatedPlan([_ship_chunk(c) for c in plan.chunks], plan.num_sms)
    return MultiplexedPlan([_ship_chunk(c) for c in plan.prefill], plan.num_sms_prefill,
                           [_ship_chunk(c) for c in plan.decode], plan.num_sms_decode, plan.k)
