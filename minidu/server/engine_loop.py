"""One background thread owns the Engine (which is not thread-safe) and steps it while requests are in flight; asyncio
handlers submit requests and receive each step's RequestOutputs through thread-safe queues."""
import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from minidu.engine import Engine
from minidu.outputs import RequestOutput
from minidu.sampling_params import SamplingParams
from minidu.server.prometheus import ServerMetrics

logger = logging.getLogger("minidu.server")


class EngineError(RuntimeError):
    """The engine failed while running a request (the server answers 500); the message says how."""


@dataclass(slots=True)
class _Stream:
    """Where the engine thread delivers one request's outputs: an asyncio queue on the handler's event loop."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | Exception) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineLoop:
    """Runs `engine` in a thread: `async for out in loop.generate(...)` streams a request; leaving the loop early (a
    client that disconnected) aborts it. An exception in a step fails the requests of that step (all in flight: the
    engine does not say which) with EngineError, and the loop goes on."""

    def __init__(self, engine: Engine, metrics: ServerMetrics):
        self.engine, self.metrics = engine, metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="minidu-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Aborts whatever is still in flight (its handlers see finish_reason "abort") and stops the thread."""
        if self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout)

    def call(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Runs fn(engine) on the engine thread between steps, for a consistent look at its state."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, future))
        return future

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       arrival_time: float) -> AsyncIterator[RequestOutput]:
        """The request's outputs, one per step that gave it tokens, the last with finished set. Raises EngineError."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", request_id, prompt_token_ids, params, arrival_time, stream))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._commands.put(("abort", request_id))

    # ---- the engine thread ----

    def _run(self) -> None:
        while True:
            busy = self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=not busy)
            except queue.Empty:
                command = None
            if command is not None:
                if command[0] == "stop":
                    self._fail_all(EngineError("the server shut down before this request finished"))
                    return
                self._handle(command)
                continue  # take every queued command before the next step, so arrivals batch together
            self._step()
            self._publish_state()

    def _handle(self, command: tuple) -> None:
        kind, *args = command
        if kind == "add":
            request_id, prompt, params, arrival_time, stream = args
            try:
                self.engine.add_request(prompt, params, request_id=request_id, arrival_time=arrival_time)
            except Exception as e:  # a duplicate id or a refused request: only this one fails
                stream.put(EngineError(f"the engine refused the request: {e}"))
                return
            self._streams[request_id] = stream
        elif kind == "abort":
            if self._streams.pop(args[0], None) is not None:
                self._try(self.engine.abort, args[0])
        elif kind == "call":
            fn, future = args
            try:
                future.set_result(fn(self.engine))
            except Exception as e:
                future.set_exception(e)
        self._publish_state()

    def _step(self) -> None:
        """The one place the engine is stepped: outputs go to their streams, the step to the metrics."""
        try:
            result = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing the %d requests in flight", len(self._streams))
            self._fail_all(EngineError(f"the engine failed while running this request: {type(e).__name__}: {e}"))
            return
        if result.plan is not None:
            self.metrics.on_step(result)
        for out in result.outputs:
            self.metrics.on_output(out)
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted by its handler, or failed earlier: nobody listens
                continue
            if out.error:
                stream.put(EngineError(out.error))
            else:
                stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, error: EngineError) -> None:
        for request_id, stream in self._streams.items():
            self._try(self.engine.abort, request_id)
            stream.put(error)
        self._streams.clear()

    def _publish_state(self) -> None:
        s = self.engine.scheduler
        bm = s.block_manager
        self.metrics.on_state(len(s.running), len(s.waiting), 1 - bm.num_free_blocks / bm.num_blocks,
                              s.num_preemptions)

    @staticmethod
    def _try(fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("%s failed", getattr(fn, "__name__", fn))
