"""What the engine hands back: for a request, its tokens, text, why it finished and when each token came; for a step,
those outputs with the plan that ran, its SM budgets and its predicted and measured time."""
from dataclasses import dataclass, field

from minidu.scheduler.plan import Plan, StepPart


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # all generated tokens so far (from step(): see new_token_ids for this step's)
    text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    new_token_ids: list[int] = field(default_factory=list)
    error: str | None = None  # set when the request was rejected (for example a prompt longer than max_model_len)
    arrival_time: float = 0.0
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(slots=True)
class StepResult:
    """One `Engine.step()`: the outputs of the requests that gained tokens or finished, the plan that ran (None when
    only rejected requests were reported) on at most `num_sms` SMs (the plan's own budgets say how they were split),
    the step's start and end on the engine clock, the latency model's predicted seconds (None without one), and the
    predicted and measured time of each part of the step that its token times reveal (empty without a model)."""

    outputs: list[RequestOutput]
    plan: Plan | None
    start: float
    end: float
    predicted_time: float | None
    num_sms: int
    parts: list[StepPart] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        return self.end - self.start
