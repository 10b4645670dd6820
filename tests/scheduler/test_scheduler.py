"""Aggregated scheduler: decode-first chunked prefill, token budget, preemption with recompute, no lost or duplicated
tokens. A fake model whose next token is a hash of the whole history stands in for the executor."""
import pytest
from hypothesis import given, strategies as st

from minidu.scheduler.block_manager import BlockManager
from minidu.scheduler.plan import AggregatedPlan, MultiplexedPlan, StepOutput
from minidu.scheduler.scheduler import Scheduler, SchedulerConfig
from minidu.scheduler.sequence import Sequence, SequenceStatus
from tests.scheduler.helpers import state

VOCAB = 50


def next_token(history: list[int]) -> int:
    return hash(tuple(history)) % VOCAB


def expected_output(prompt: list[int], max_tokens: int, stop: int | None) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
        if tokens[-1] == stop:
            break
    return tokens[len(prompt):]


def schedule(scheduler: Scheduler) -> AggregatedPlan:
    proposal = scheduler.propose()
    return scheduler.commit(AggregatedPlan(proposal.chunks, preempt=proposal.preempt))


def run(scheduler: Scheduler, max_steps: int = 10_000) -> list:
    plans = []
    while scheduler.has_unfinished():
        plan = schedule(scheduler)
        assert plan.chunks, "a step with unfinished requests must make progress"
        assert plan.num_tokens <= scheduler.config.max_num_batched_tokens
        sampled = StepOutput()
        for c in plan.chunks:
            assert c.start == c.seq.num_computed_tokens
            assert len(c.seq.block_table) * scheduler.block_manager.block_size >= c.start + c.num_new_tokens
            if c.samples:
                sampled.add(c.seq.seq_id, [next_token(c.seq.token_ids)], [0.0])
        scheduler.postprocess(plan, sampled)
        plans.append(plan)
        assert len(plans) < max_steps
    return plans


def make(num_blocks=64, block_size=4, budget=32, max_num_seqs=8, max_model_len=128, prefix=True):
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len), bm)


requests = st.lists(st.tuples(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30), st.integers(1, 12)),
                    min_size=1, max_size=6)


@given(requests, st.integers(4, 24), st.integers(12, 40), st.booleans())
def test_outputs_match_sequential_reference(reqs, budget, num_blocks, prefix):
    sched = make(num_blocks=num_blocks, budget=budget, max_num_seqs=4, max_model_len=44, prefix=prefix)
    seqs = []
    for i, (prompt, max_tokens) in enumerate(reqs):
        seq = Sequence(str(i), list(prompt), max_tokens, stop_token_ids=frozenset({7}))
        sched.add(seq)
        seqs.append(seq)
    run(sched)
    for seq, (prompt, max_tokens) in zip(seqs, reqs):
        limit = min(max_tokens, 44 - len(prompt))
        assert seq.output_token_ids == expected_output(prompt, limit, 7)
        assert seq.finish_reason in ("stop", "length")
    assert sched.block_manager.num_free_blocks == num_blocks


def test_decodes_come_first_and_prefill_is_chunked():
    sched = make(budget=8)
    a = Sequence("a", [1, 2, 3], 5)
    sched.add(a)
    run_one = schedule(sched)
    sched.postprocess(run_one, StepOutput({a.seq_id: [9]}))
    b = Sequence("b", list(range(20)), 5)
    sched.add(b)
    plan = schedule(sched)
    assert [(c.seq.request_id, c.num_new_tokens) for c in plan.chunks] == [("a", 1), ("b", 7)]
    assert not plan.chunks[1].samples


def test_tiny_pool_preempts_newest_and_recomputes():
    sched = make(num_blocks=8, block_size=4, budget=16, max_model_len=32)
    seqs = [Sequence(str(i), [i + 1] * 6, 20) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run(sched)
    assert sched.num_preemptions > 0
    assert max(seqs, key=lambda s: s.seq_id).num_preemptions > 0
    for s in seqs:
        assert s.output_token_ids == expected_output([int(s.request_id) + 1] * 6, 20, None)


def test_abort_frees_blocks():
    sched = make()
    a, b = Sequence("a", list(range(10)), 50), Sequence("b", list(range(5)), 50)
    sched.add(a)
    sched.add(b)
    sched.postprocess(schedule(sched), StepOutput({a.seq_id: [1], b.seq_id: [2]}))
    assert sched.abort("a") is a and a.finish_reason == "abort"
    assert sched.abort("missing") is None
    sched.abort("b")
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 64


def test_config_rejects_budget_below_num_seqs():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)


@given(requests, st.integers(4, 24), st.integers(12, 40), st.data())
def test_proposals_change_nothing_and_rejected_chunks_leave_no_trace(reqs, budget, num_blocks, data):
    """Each step: propose twice (same answer, same state), then commit a random prefix of the proposal, the last
    chunk possibly truncated; dropped requests keep their state, and everything still finishes correctly."""
    sched = make(num_blocks=num_blocks, budget=budget, max_num_seqs=4, max_model_len=44)
    for i, (prompt, max_tokens) in enumerate(reqs):
        sched.add(Sequence(str(i), list(prompt), max_tokens))
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        before = state(sched)
        proposal = sched.propose()
        assert state(sched) == before
        assert sched.propose() == proposal
        keep = data.draw(st.integers(1 if proposal.chunks else 0, len(proposal.chunks)))
        chunks = proposal.chunks[:keep]
        if chunks:
            chunks[-1] = chunks[-1].truncated(data.draw(st.integers(1, chunks[-1].num_new_tokens)))
        dropped = [c.seq for c in proposal.chunks[keep:] if c.seq not in proposal.preempt]
        dropped_state = [(s.status, s.num_computed_tokens, tuple(s.block_table), s.num_preemptions) for s in dropped]
        plan = sched.commit(AggregatedPlan(chunks, preempt=proposal.preempt))
        for seq, (status, computed, table, preemptions) in zip(dropped, dropped_state):
            unchanged = (seq.status, seq.num_computed_tokens, tuple(seq.block_table)) == (status, computed, table)
            evicted = (status is SequenceStatus.RUNNING and seq.status is SequenceStatus.WAITING
                       and not seq.block_table and seq.num_preemptions == preemptions + 1)
            assert unchanged or evicted, "a dropped chunk's request is untouched, or evicted for a kept chunk's room"
        sampled = StepOutput()
        for c in plan.chunks:
            assert len(c.seq.block_table) * sched.block_manager.block_size >= c.start + c.num_new_tokens
            if c.samples:
                sampled.add(c.seq.seq_id, [next_token(c.seq.token_ids)], [0.0])
        sched.postprocess(plan, sampled)
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == num_blocks


def test_chunk_kind_is_fixed_when_scheduled():
    sched = make(budget=8)
    a = Sequence("a", [1, 2, 3], 5)
    sched.add(a)
    chunk = sched.propose().chunks[0]
    assert chunk.samples and not chunk.is_decode
    a.token_ids.append(4)  # the sequence changes; the scheduled chunk does not
    assert chunk.samples and not chunk.is_decode
    cut = chunk.truncated(2)
    assert (cut.start, cut.num_new_tokens, cut.samples) == (0, 2, False)


def test_commit_admits_only_chosen_requests():
    sched = make(budget=16)
    a, b = Sequence("a", list(range(6)), 5), Sequence("b", list(range(50, 56)), 5)
    sched.add(a)
    sched.add(b)
    proposal = sched.propose()
    assert [c.seq for c in proposal.chunks] == [a, b]
    sched.commit(AggregatedPlan(proposal.chunks[:1]))
    assert sched.running == [a] and list(sched.waiting) == [b] and not b.block_table


@pytest.mark.parametrize("num_blocks, max_tokens, k", [(64, (3, 4), 3), (4, (10, 10), 5)], ids=["tokens", "blocks"])
def test_reserve_lookahead_stops_at_max_tokens_and_free_blocks(num_blocks, max_tokens, k):
    """k shrinks to what the longest-running request can still generate (b: 3 more) or to what the two free blocks
    hold (5 look-ahead tokens each reach token 8 of blocks of 4: one more block each)."""
    sched = make(num_blocks=num_blocks, block_size=4, budget=16, max_model_len=16)
    a, b = Sequence("a", [1] * 3, max_tokens[0]), Sequence("b", [2] * 3, max_tokens[1])
    for s in (a, b):
        sched.add(s)
    plan = schedule(sched)
    sched.postprocess(plan, StepOutput({a.seq_id: [5], b.seq_id: [6]}, {a.seq_id: [0.0], b.seq_id: [0.0]}))
    proposal = sched.propose()
    assert all(c.is_decode for c in proposal.chunks)
    plan = sched.commit(MultiplexedPlan([], 1, proposal.chunks, 1, k=8))
    assert plan.k == k
    assert all(len(s.block_table) * 4 >= s.num_computed_tokens + k for s in (a, b))
