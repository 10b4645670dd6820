"""The server's Prometheus metrics. Names follow vLLM's (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, ...)
so existing dashboards and scrapers work unchanged; what only minidu has is named `minidu:*`."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from minidu.outputs import RequestOutput, StepResult
from minidu.scheduler.plan import MultiplexedPlan

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0)
ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

disable_created_metrics()  # the *_created series vLLM does not export either


class ServerMetrics:
    """One registry per server (so several servers in one process do not clash), labelled with the model name."""

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        label = {"labelnames": ["model_name"], "registry": r}
        self.running = Gauge("vllm:num_requests_running", "Requests being scheduled.", **label)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", **label)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = full).", **label)
        self.preemptions = Counter("vllm:num_preemptions", "Preemptions (a request's blocks taken back).", **label)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of requests that started generating.",
                                     **label)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", **label)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               labelnames=["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", buckets=LATENCY_BUCKETS,
                              **label)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=LATENCY_BUCKETS, **label)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", buckets=LATENCY_BUCKETS,
                             **label)
        self.steps = Counter("minidu:steps", "Engine steps by mode (aggregated or multiplexed).",
                             labelnames=["model_name", "mode"], registry=r)
        self.decode_sms = Gauge("minidu:decode_sms", "SMs given to decode in the latest multiplexed step.", **label)
        self.k = Gauge("minidu:multiplex_k", "Decode steps run beside one prefill in the latest multiplexed step.",
                       **label)
        self.model_error = Histogram("minidu:latency_model_relative_error",
                                     "|predicted - measured| / measured step time of the latency model.",
                                     buckets=ERROR_BUCKETS, **label)
        self._name = model_name
        self._preemptions_seen = 0
        for metric in (self.running, self.waiting, self.kv_usage, self.preemptions, self.prompt_tokens,
                       self.generation_tokens, self.ttft, self.itl, self.e2e, self.decode_sms, self.k,
                       self.model_error):
            metric.labels(model_name)  # export every series from the start, zero until something happens
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)

    def on_state(self, num_running: int, num_waiting: int, kv_usage: float, num_preemptions: int) -> None:
        self.running.labels(self._name).set(num_running)
        self.waiting.labels(self._name).set(num_waiting)
        self.kv_usage.labels(self._name).set(kv_usage)
        self.preemptions.labels(self._name).inc(num_preemptions - self._preemptions_seen)
        self._preemptions_seen = num_preemptions

    def on_step(self, result: StepResult) -> None:
        multiplexed = isinstance(result.plan, MultiplexedPlan)
        self.steps.labels(self._name, "multiplexed" if multiplexed else "aggregated").inc()
        if multiplexed:
            self.decode_sms.labels(self._name).set(result.plan.num_sms_decode)
            self.k.labels(self._name).set(result.plan.k)
        if result.predicted_time is not None and result.elapsed > 0:
            self.model_error.labels(self._name).observe(abs(result.predicted_time - result.elapsed) / result.elapsed)

    def on_output(self, out: RequestOutput) -> None:
        """Counts a step's output of one request: its new tokens, their gaps, and its end."""
        new = len(out.new_token_ids)
        if new:
            self.generation_tokens.labels(self._name).inc(new)
            if len(out.token_ids) == new:
                self.prompt_tokens.labels(self._name).inc(len(out.prompt_token_ids))
                self.ttft.labels(self._name).observe(out.ttft)
            times = out.token_times[-new - 1:] if len(out.token_ids) > new else out.token_times
            for before, after in zip(times, times[1:]):
                self.itl.labels(self._name).observe(after - before)
        if out.finished:
            self.success.labels(self._name, out.finish_reason or "unknown").inc()
            if out.token_times:
                self.e2e.labels(self._name).observe(out.token_times[-1] - out.arrival_time)
