"""What the engine hands back for a request: its tokens, text, why it finished and when each token came."""
from dataclasses import dataclass, field


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
