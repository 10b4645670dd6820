"""minidu.Engine: the front door. Turns prompts into requests, asks the scheduler for a plan each step, has an executor
run it, and turns sampled tokens back into text and RequestOutputs."""
import dataclasses
import math
import random
import uuid
from dataclasses import dataclass, field

from minidu.engine_config import EngineConfig, build_parts
from minidu.outputs import RequestOutput, StepResult
from minidu.sampling_params import SamplingParams
from minidu.scheduler.plan import measured_parts, plan_chunks, plan_times
from minidu.scheduler.sequence import Sequence
from minidu.tokenizer import IncrementalDetokenizer, find_stop
from minidu.tp_executor import RankFailedError


@dataclass(slots=True)
class _Request:
    seq: Sequence  # seq.params holds the request's SamplingParams
    text: str = ""
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    error: str | None = None
    detokenizer: IncrementalDetokenizer | None = None


class Engine:
    """An LLM engine: `Engine(model).generate(prompts, SamplingParams(...))`, or add_request/step for streaming.

    `model` is a local Hugging Face checkpoint directory, a GGUF file, a preset name (random weights) or a Hub repo id;
    `options` are EngineConfig's fields (vLLM's names where vLLM has them). `policy` is one of "aggregated", "prefill-first", "static" (fixed SM split, `decode_sms`) and "duet" (adaptive,
    needs `tbt_slo_ms`); the last two use a latency model over `hardware` (h100, h200, a100 or a profile JSON; found
    from the CUDA device's name by default). `backend="sim"` runs no model: steps take the latency model's predicted
    time on a virtual clock and produce placeholder tokens.
    """

    def __init__(self, model: str, **options):
        unknown = sorted(set(options) - set(EngineConfig.__dataclass_fields__) - {"model"})
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; the options are EngineConfig's fields")
        self.config = EngineConfig(model, **options)
        parts = build_parts(self.config)
        self.model_config, self.tokenizer = parts.model_config, parts.tokenizer
        self.scheduler, self.executor, self.policy = parts.scheduler, parts.executor, parts.policy
        self.max_model_len, self.latency_model = parts.max_model_len, parts.latency_model
        self.num_sms = parts.num_sms
        self._rng = random.Random(self.config.seed)
        self._requests: dict[str, _Request] = {}
        self._rejected: list[RequestOutput] = []
        self._fatal: RankFailedError | None = None  # a lost tensor-parallel rank: no step can run again

    def shutdown(self) -> None:
        """Stops the engine's other processes (tensor-parallel ranks), if any; idempotent."""
        stop = getattr(self.executor, "shutdown", None)
        if stop is not None:
            stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- requests ----

    def clock(self) -> float:
        """The engine's clock in seconds: the host's, or the simulated GPU's virtual one."""
        return self.executor.clock()

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queues a request; returns its id. A request that cannot run (for example a prompt longer than
        max_model_len) is not raised: it finishes at the next step with finish_reason "abort" and `error` set. Raises
        RankFailedError once a tensor-parallel rank is lost."""
        if self._fatal is not None:
            raise self._fatal
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        request_id = self._check_request_id(request_id)
        if arrival_time is not None and (not isinstance(arrival_time, (int, float)) or isinstance(arrival_time, bool)
                                         or not math.isfinite(arrival_time)):
            raise ValueError(f"arrival_time must be None or a finite number, got {arrival_time!r}")
        now = self.clock() if arrival_time is None else arrival_time
        try:
            token_ids = self._tokenize(prompt)
        except ValueError as e:
            ids = list(prompt) if isinstance(prompt, list) else []
            self._rejected.append(RequestOutput(request_id, ids, [], "", True, "abort", error=str(e), arrival_time=now))
            return request_id
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids |= set(self.model_config.eos_token_ids)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        seq = Sequence(request_id, token_ids, params.max_tokens, arrival_time=now, stop_token_ids=frozenset(stop_ids),
                       params=params, seed=seed)
        detokenizer = None if self.tokenizer is None else IncrementalDetokenizer.for_prompt(self.tokenizer, len(token_ids))
        self._requests[request_id] = _Request(seq, detokenizer=detokenizer)
        self.scheduler.add(seq)
        return request_id

    def _check_request_id(self, request_id) -> str:
        if request_id is None:
            return uuid.uuid4().hex
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be None or a non-empty str, got {request_id!r}")
        if request_id in self._requests or any(o.request_id == request_id for o in self._rejected):
            raise ValueError(f"request_id {request_id!r} is already in use by a request that has not finished")
        return request_id

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (tokenizer.json); pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt token ids must lie in [0, {vocab}), got {[t for t in ids if not 0 <= t < vocab][:5]}")
        else:
            raise ValueError(f"prompt must be a str or a list of int token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, which leaves no room to generate within "
                             f"max_model_len={self.max_model_len}")
        return ids

    def abort(self, request_id: str) -> None:
        """Stops a request; its blocks are freed and its output so far is reported with finish_reason "abort"."""
        if request_id in self._requests:
            self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._rejected) or any(
            r.seq.is_finished for r in self._requests.values())

    # ---- stepping ----

    def step(self) -> StepResult:
        """Runs one step: the policy chooses a plan from the scheduler's proposal, the scheduler commits it, the
        executor runs it. Returns an output for each request that gained tokens or finished, with the plan.
        Raises RankFailedError, now and at every later step, once a tensor-parallel rank is lost."""
        if self._fatal is not None:
            raise self._fatal
        outputs, self._rejected = self._rejected, []
        new_tokens: dict[str, list[int]] = {}
        plan, predicted, parts, start = None, None, [], self.clock()
        if self.scheduler.has_unfinished():
            plan = self.scheduler.commit(self.policy.plan(self.scheduler))
            if self.latency_model is not None:
                predicted = plan_times(self.latency_model, plan, self.num_sms)
            try:
                run_start = self.clock()
                output = self.executor.execute(plan)
                if predicted is not None:
                    parts = measured_parts(plan, predicted, output, run_start, self.clock(), self.num_sms)
                    self.policy.observe(parts)
                updates = self.scheduler.postprocess(plan, output)
            except RankFailedError as e:
                self._fail_step(plan, e)
                self._fatal = e
                raise
            except Exception as e:  # noqa: BLE001  (any failure of the step must not strand the others)
                self._fail_step(plan, e)
                updates = []
            for seq, tokens, times in updates:
                if tokens:
                    self._on_tokens(self._requests[seq.request_id], tokens, times)
                new_tokens[seq.request_id] = tokens
        for request_id, req in list(self._requests.items()):
            if request_id in new_tokens or req.seq.is_finished:
                outputs.append(self._output(req, new_tokens.get(request_id, [])))
                if req.seq.is_finished:
                    del self._requests[request_id]
        return StepResult(outputs, plan, start, self.clock(), predicted and predicted[2], self.num_sms, parts)

    def _fail_step(self, plan, error: Exception) -> None:
        """Ends the requests of a step that raised with finish_reason "abort" and the error, freeing their blocks;
        requests outside the step are untouched and the engine stays usable."""
        for seq in {c.seq.request_id: c.seq for c in plan_chunks(plan)}.values():
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
            self._requests[seq.request_id].error = f"the step running this request failed: {type(error).__name__}: {error}"

    def generate(self, prompts: str | list, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs prompts (texts or token-id lists) to completion; returns their outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        wanted, done = set(ids), {}
        from tqdm.auto import tqdm

        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
            while wanted - done.keys():
                for out in self.step().outputs:
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> RequestOutput | list[RequestOutput]:
        """Answers a conversation (or a list of them) with the model's chat template, stopping at its end of turn."""
        batch = bool(messages) and isinstance(messages[0], list)
        requests = [self.chat_request(m, sampling_params) for m in (messages if batch else [messages])]
        outputs = self.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=use_tqdm)
        return outputs if batch else outputs[0]

    def chat_request(self, messages: list[dict], params: SamplingParams | None = None) -> tuple[list[int], SamplingParams]:
        """The prompt token ids of a conversation and `params` with the template's end-of-turn tokens as stops."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer, and this model has none")
        params = params or SamplingParams()
        stops = sorted(set(params.stop_token_ids or ()) | set(self.tokenizer.eot_token_ids))
        return self.tokenizer.apply_chat_template(messages), dataclasses.replace(params, stop_token_ids=stops)

    def _output(self, req: _Request, new_tokens: list[int]) -> RequestOutput:
        seq = req.seq
        return RequestOutput(seq.request_id, seq.token_ids[:seq.num_prompt_tokens], seq.output_token_ids, req.text,
                             seq.is_finished, seq.finish_reason, list(new_tokens), req.error, seq.arrival_time,
                             req.first_token_time, list(req.token_times))

    def _on_tokens(self, req: _Request, new_tokens: list[int], times: list[float]) -> None:
        if req.first_token_time is None:
            req.first_token_time = times[0]
        req.token_times += times
        if req.detokenizer is None:
            return
        old = len(req.text)
        req.text = req.detokenizer.update(req.seq.token_ids, req.seq.is_finished)
        hit = find_stop(req.text, req.seq.params.stop, old)
        if hit is not None:
            req.text = req.text[:hit]
            if not req.seq.is_finished:
                self.scheduler.finish(req.seq, "stop")
            req.seq.finish_reason = "stop"
