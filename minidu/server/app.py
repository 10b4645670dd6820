"""The FastAPI application: OpenAI routes over an EngineLoop, errors as OpenAI error bodies, /health and /metrics."""
import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from minidu.outputs import RequestOutput
from minidu.sampling_params import SamplingParams
from minidu.server.body_limit import BodyLimit
from minidu.server.engine_loop import EngineError, EngineLoop
from minidu.server.inputs import APIError, chat_input, completion_input
from minidu.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                    ChatCompletionRequest, ChatCompletionResponse, CompletionChoice,
                                    CompletionRequest, CompletionResponse, DeltaMessage, ErrorResponse, ModelCard,
                                    ModelList, Usage)

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 500)}


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


def build_app(loop: EngineLoop, model_name: str, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The server for `loop`'s engine, answering to `model_name`; the lifespan starts and stops the engine loop."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        yield
        await asyncio.to_thread(loop.shutdown)

    app = FastAPI(title="minidu", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _add_error_handlers(app)
    engine = loop.engine

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(loop.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, max_model_len=engine.max_model_len)])

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(req: CompletionRequest, request: Request):
        _check_model(req.model, model_name)
        ids, params = completion_input(engine, req)
        rid = f"cmpl-{uuid.uuid4().hex}"

        def chunk(text: str, reason: str | None, usage: Usage | None) -> CompletionResponse:
            return CompletionResponse(id=rid, model=model_name, usage=usage,
                                      choices=[CompletionChoice(text=text, finish_reason=reason)])

        return await _answer(loop, request, rid, ids, params, req.stream, _include_usage(req), chunk, chunk)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        _check_model(req.model, model_name)
        ids, params = chat_input(engine, req)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(text: str, reason: str | None, usage: Usage | None) -> ChatCompletionChunk:
            delta = DeltaMessage(content=text) if text or reason is None else DeltaMessage()
            return ChatCompletionChunk(id=rid, model=model_name, usage=usage,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=reason)])

        def final(text: str, reason: str | None, usage: Usage) -> ChatCompletionResponse:
            return ChatCompletionResponse(id=rid, model=model_name, usage=usage, choices=[
                ChatChoice(message=AssistantMessage(content=text), finish_reason=reason)])

        return await _answer(loop, request, rid, ids, params, req.stream, _include_usage(req), chunk, final,
                             first=ChatCompletionChunk(id=rid, model=model_name, choices=[
                                 ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))]))

    return app


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(f"The model `{name}` does not exist; this server serves `{served}`", status=404, param="model",
                       type="NotFoundError")


def _include_usage(req) -> bool:
    return req.stream_options is not None and req.stream_options.include_usage


def _usage(out: RequestOutput) -> Usage:
    prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _visible_text(out: RequestOutput, params: SamplingParams) -> str:
    """The text that later tokens cannot take back: while unfinished, a tail that may be the start of a stop string
    (which the engine would cut off) is held back."""
    hold = max(map(len, params.stop or [""])) - 1
    return out.text if out.finished or hold <= 0 else out.text[:max(0, len(out.text) - hold)]


async def _answer(loop: EngineLoop, request: Request, rid: str, ids: list[int], params: SamplingParams, stream: bool,
                  include_usage: bool, chunk: Callable, final: Callable, first=None):
    """Runs the request; answers JSON, or server-sent events once its first output is in (so that a request that
    fails before producing anything gets a proper error status)."""
    outputs = loop.generate(rid, ids, params, loop.engine.clock())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        head = await _next(outputs, gone)
    except BaseException:
        gone.cancel()
        raise
    if stream:
        return StreamingResponse(_events(outputs, head, gone, params, include_usage, chunk, first),
                                 media_type="text/event-stream")
    try:
        out = head
        while not out.finished:
            out = await _next(outputs, gone)
    finally:
        gone.cancel()
    return final(out.text, out.finish_reason, _usage(out))


async def _events(outputs: AsyncIterator[RequestOutput], out: RequestOutput, gone: asyncio.Future,
                  params: SamplingParams, include_usage: bool, chunk: Callable, first) -> AsyncIterator[str]:
    sent = 0
    try:
        if first is not None:
            yield _sse(first)
        while True:
            text = _visible_text(out, params)
            if text[sent:] or out.finished:
                usage = _usage(out) if out.finished and not include_usage else None
                yield _sse(chunk(text[sent:], out.finish_reason if out.finished else None, usage))
                sent = len(text)
            if out.finished:
                break
            out = await _next(outputs, gone)
        if include_usage:
            yield _sse(chunk("", None, _usage(out)).model_copy(update={"choices": []}))
    except EngineError as e:  # the status line is out already: the error travels as an event
        yield _sse(_error(str(e), 500, "InternalServerError"))
    except ClientGone:
        return
    finally:
        gone.cancel()
    yield "data: [DONE]\n\n"


def _sse(obj: BaseModel | dict) -> str:
    return f"data: {obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)}\n\n"


async def _next(outputs: AsyncIterator[RequestOutput], gone: asyncio.Future) -> RequestOutput:
    """The request's next output, or ClientGone if the client leaves first. Leaving (or this task being cancelled)
    cancels the wait inside `outputs`, whose cleanup aborts the request in the engine."""
    step = asyncio.ensure_future(anext(outputs))
    try:
        await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left = not step.done()
        if left:
            step.cancel()
    if left:
        raise ClientGone
    return step.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error(message: str, status: int, type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def _error_body(message: str, status: int, type: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(_error(message, status, type, param), status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_body(e.message, e.status, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors()]
        if any(err["loc"] == ("body",) and err["type"] == "model_attributes_type" for err in e.errors()):
            problems = ["the body must be a JSON object (sent with Content-Type: application/json)"]
        return _error_body("; ".join(problems[:8]), 400, "BadRequestError")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return _error_body(str(e.detail), e.status_code, "HTTPError")

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, e: EngineError) -> JSONResponse:
        return _error_body(str(e), 500, "InternalServerError")

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it


def serve(engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_body_bytes: int = 1 << 20,
          shutdown_timeout: float = 30.0) -> None:
    """Serves `engine` until SIGINT or SIGTERM; then new connections are refused, requests in flight get up to
    `shutdown_timeout` seconds to finish, and what remains is aborted; last the engine stops its other ranks."""
    import uvicorn

    from minidu.server.prometheus import ServerMetrics

    app = build_app(EngineLoop(engine, ServerMetrics(model_name)), model_name, max_body_bytes)
    try:
        uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout, log_level="info")
    finally:
        engine.shutdown()
