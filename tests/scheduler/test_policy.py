"""Policies read proposals and return plans: they never change the scheduler; prefill-first never mixes; static always
splits at its budget; duet runs aggregated while the mixed step meets the objective and otherwise splits on one of
its decode budgets so that the corrected decode step meets it, keeping a truncated FCFS prefix of the prefill."""
import pytest

import minidu
from minidu.scheduler.block_manager import BlockManager
from minidu.scheduler.correction import StepCorrection
from minidu.scheduler.plan import AggregatedPlan, MultiplexedPlan, StepOutput, StepPart, plan_times
from minidu.scheduler.policy import AggregatedPolicy, DuetPolicy, PrefillFirstPolicy, StaticPolicy
from minidu.scheduler.scheduler import Scheduler, SchedulerConfig
from minidu.scheduler.sequence import Sequence
from tests.scheduler.helpers import state

TAU = 0.05
MODEL = minidu.Engine("qwen3-8b", backend="sim", hardware="h200").latency_model


def scheduler_with(num_decodes: int, context: int, prompt: int, budget: int = 8192) -> Scheduler:
    """`num_decodes` running requests one token past a `context`-token prompt, and one waiting `prompt`-token one."""
    sched = Scheduler(SchedulerConfig(64, budget, 40960), BlockManager(40000, 16))
    decodes = [Sequence(f"d{i}", [i % 100 + 1] * context, 100) for i in range(num_decodes)]
    for seq in decodes:
        sched.add(seq)
    while any(s.num_output_tokens == 0 for s in decodes):
        proposal = sched.propose()
        plan = sched.commit(AggregatedPlan(proposal.chunks, preempt=proposal.preempt))
        sched.postprocess(plan, StepOutput({c.seq.seq_id: [7] for c in plan.chunks if c.samples},
                                           {c.seq.seq_id: [0.0] for c in plan.chunks if c.samples}))
    if prompt:
        sched.add(Sequence("p", list(range(1, prompt + 1)), 10))
    return sched


POLICIES = [AggregatedPolicy(), PrefillFirstPolicy(), StaticPolicy(MODEL, 132, 32), DuetPolicy(MODEL, 132, TAU)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_planning_changes_nothing(policy):
    sched = scheduler_with(8, 2000, 9000)
    before = state(sched)
    plan = policy.plan(sched)
    assert state(sched) == before
    assert plan == policy.plan(sched)


def test_prefill_first_runs_prefill_alone_then_decodes():
    sched = scheduler_with(4, 100, 50)
    plan = PrefillFirstPolicy().plan(sched)
    assert [c.seq.request_id for c in plan.chunks] == ["p"]
    plan = PrefillFirstPolicy().plan(scheduler_with(4, 100, 0))
    assert all(c.is_decode for c in plan.chunks) and len(plan.chunks) == 4


def test_static_always_splits_at_its_budget():
    plan = StaticPolicy(MODEL, 132, 32, max_k=4).plan(scheduler_with(8, 2000, 9000))
    assert isinstance(plan, MultiplexedPlan) and (plan.num_sms_decode, plan.num_sms_prefill) == (32, 100)
    assert 1 <= plan.k <= 4 and [c.num_new_tokens for c in plan.prefill] == [8192 - 8]


def test_duet_stays_aggregated_while_the_mixed_step_meets_the_objective():
    sched = scheduler_with(8, 2000, 200)
    proposal = sched.propose()
    assert plan_times(MODEL, AggregatedPlan(proposal.chunks), 132)[2] < TAU * 0.9
    plan = DuetPolicy(MODEL, 132, TAU).plan(sched)
    assert isinstance(plan, AggregatedPlan) and plan.chunks == proposal.chunks


@pytest.mark.parametrize("slowdown", [1.0, 2.5])
def test_duet_splits_so_the_corrected_decode_step_meets_the_objective(slowdown):
    sched = scheduler_with(8, 2000, 9000)
    proposal = sched.propose()
    assert plan_times(MODEL, AggregatedPlan(proposal.chunks), 132)[2] > TAU  # aggregated breaks the objective
    policy = DuetPolicy(MODEL, 132, TAU, decode_sms_choices=(16, 32, 48, 64))
    for num_sms in (16, 32, 48, 64):  # every decode budget measured `slowdown` times slower than predicted
        policy.observe([StepPart("decode", num_sms, 0.01, 0.01 * slowdown)])
    plan = policy.plan(sched)
    assert isinstance(plan, MultiplexedPlan) and plan.num_sms_decode in (16, 32, 48, 64)
    assert plan.num_sms_prefill + plan.num_sms_decode <= 132 and plan.k >= 1
    assert plan.decode == [c for c in proposal.chunks if c.is_decode]
    (kept,), (proposed,) = plan.prefill, [c for c in proposal.chunks if not c.is_decode]
    assert (kept.seq, kept.start) == (proposed.seq, proposed.start) and kept.num_new_tokens <= proposed.num_new_tokens
    t_d = plan_times(MODEL, plan, 132)[1]
    assert t_d * policy.correction.factor("decode", plan.num_sms_decode) <= TAU * (1 - policy.margin)


def test_slower_decodes_need_more_decode_sms():
    sched = scheduler_with(32, 4000, 9000)
    budgets = []
    for slowdown in (1.0, 3.0):
        policy = DuetPolicy(MODEL, 132, TAU, correction=StepCorrection())
        policy.observe([StepPart("decode", s, 0.01, 0.01 * slowdown) for s in (16, 32, 48, 64, 80, 96, 112)])
        budgets.append(policy.plan(sched).num_sms_decode)
    assert budgets[1] > budgets[0]
