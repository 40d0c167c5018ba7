"""`loom api`: an OpenAI-compatible HTTP server (FastAPI) over one engine, and the same app inside Ray Serve replicas.

Endpoints: GET /v1/models, POST /v1/chat/completions (plain and server-sent-event streaming, n, stop, temperature,
top_p, max_tokens, tools with parsed tool_calls), POST /v1/score/evaluation (LLaMA-Factory's reward scoring).
Every error is OpenAI-shaped ({"error": {"message", "type", "param", "code"}}); a request is never answered with a
traceback. Settings come from LLaMA-Factory's environment variables (ApiSettings).
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the endpoints' annotations from these globals

from orchestrator.errors import ConfigError, Problem

from .admission import Admission, Busy
from .engine import Engine, Sampling
from .openai_schema import (
    DONE,
    ApiError,
    ChatRequest,
    ScoreRequest,
    chunk,
    completion,
    conversation,
    new_id,
    sampling,
    tool_calls_json,
)

log = logging.getLogger("loom.api")
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class ApiSettings:
    host: str = "0.0.0.0"  # LLaMA-Factory's defaults
    port: int = 8000
    key: str | None = None
    model_name: str | None = None  # None: the trained folder's name
    verbose: bool = True
    root_path: str = ""
    max_concurrent: int = 1
    queue: int = 8  # LOOM_API_QUEUE: requests that may wait for a turn (admission.py has the exact rule)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApiSettings:
        """The settings the environment gives; every bad value reported together, naming the variable."""
        env = os.environ if env is None else env
        problems: list[Problem] = []

        def number(name: str, default: int, low: int, high: int = 1 << 30) -> int:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            if not raw.strip().isdigit() or not low <= int(raw) <= high:
                problems.append(Problem(name, f"given {raw!r}; expected a whole number from {low} to {high}"))
                return default
            return int(raw)

        verbose_raw = env.get("API_VERBOSE", "1").strip().lower()
        if verbose_raw not in TRUE | FALSE:
            problems.append(Problem("API_VERBOSE", f"given {verbose_raw!r}; expected 1 or 0 (true or false)"))
        settings = cls(
            host=env.get("API_HOST") or cls.host, port=number("API_PORT", cls.port, 0, 65535),
            key=env.get("API_KEY") or None, model_name=env.get("API_MODEL_NAME") or None,
            verbose=verbose_raw not in FALSE, root_path=env.get("FASTAPI_ROOT_PATH", ""),
            max_concurrent=number("MAX_CONCURRENT", cls.max_concurrent, 1),
            queue=number("LOOM_API_QUEUE", cls.queue, 0),
        )  # fmt: skip
        if problems:
            raise ConfigError(problems, source="the environment")
        return settings


def build_app(engine: Engine | Callable[[], Engine], settings: ApiSettings, base: Sampling) -> Any:
    """The FastAPI app. `engine` may be a function that returns it (a Serve replica binds it after loading)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException

    get_engine = engine if callable(engine) else (lambda: engine)
    app = FastAPI(title="Loom API", root_path=settings.root_path)
    admission: list[Admission] = []  # made on first use, inside the server's event loop

    def model_name() -> str:
        return settings.model_name or get_engine().source.name

    def error(exc: ApiError, headers: dict[str, str] | None = None) -> Any:
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError) -> Any:
        return error(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> Any:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return error(ApiError(400, f"{where or 'body'}: {first['msg']}", where or None))

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, exc: HTTPException) -> Any:
        return error(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def on_crash(_: Request, exc: Exception) -> Any:
        log.exception("request failed")
        return error(ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                              kind="server_error"))  # fmt: skip

    def check_key(request: Request) -> None:
        if settings.key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <API_KEY>'",
                           code="invalid_api_key")  # fmt: skip

    def ticket() -> Any:
        if not admission:
            admission.append(Admission(settings.max_concurrent, settings.queue))
        try:
            return admission[0].admit()
        except Busy as busy:
            raise _Refused(busy.retry_after) from None

    @app.exception_handler(_Refused)
    async def on_busy(_: Request, exc: _Refused) -> Any:
        message = f"server busy: {settings.max_concurrent} running and {settings.queue} waiting"
        return error(ApiError(429, message, kind="rate_limit_error", code="rate_limit_exceeded"),
                     headers={"Retry-After": str(exc.retry_after)})  # fmt: skip

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        check_key(request)
        return {"object": "list", "data": [{"id": model_name(), "object": "model", "created": 0, "owned_by": "loom"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        check_key(request)
        engine = get_engine()
        talk, sample = conversation(body), sampling(base, body)
        prompt_len = len(engine.encode(talk))
        if prompt_len >= sample.max_length:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; max_length allows {sample.max_length - 1}",
                           "messages")  # fmt: skip
        if sample.num_beams > 1 and sample.n > sample.num_beams:
            raise ApiError(400, f"n={sample.n} needs num_beams >= n (num_beams is {sample.num_beams})", "n")
        if body.stream and body.n > 1:
            raise ApiError(400, "streaming returns one choice: use n=1 or stream=false", "n")
        if settings.verbose:
            log.info("chat: %d messages, %d prompt tokens, stream=%s", len(body.messages), prompt_len, body.stream)
        place = ticket()
        if not body.stream:
            async with place:
                replies = await run_in_threadpool(engine.chat, talk, sample)
            return completion(model_name(), replies)
        return StreamingResponse(_events(engine, talk, sample, place, model_name()), media_type="text/event-stream",
                                 background=BackgroundTask(place.release))  # fmt: skip

    async def _events(engine: Engine, talk: Any, sample: Sampling, place: Any, name: str) -> AsyncIterator[str]:
        ident = new_id("chatcmpl")
        cancel = threading.Event()
        try:
            async with place:
                yield chunk(ident, name, {"role": "assistant", "content": ""})
                if talk.tools:  # a tool call is known only once the reply is whole: it is sent in one piece
                    reply = (await run_in_threadpool(engine.chat, talk, sample))[0]
                    if reply.tool_calls:
                        calls = [{"index": i, **call} for i, call in enumerate(tool_calls_json(reply))]
                        yield chunk(ident, name, {"tool_calls": calls})
                    else:
                        yield chunk(ident, name, {"content": reply.text})
                    yield chunk(ident, name, {}, reply.finish_reason)
                else:
                    async for delta in iterate_in_threadpool(engine.stream(talk, sample, cancel)):
                        yield chunk(ident, name, {"content": delta})
                    yield chunk(ident, name, {}, "stop")
                yield DONE
        finally:
            cancel.set()  # a client that left stops the generation

    @app.post("/v1/score/evaluation")
    async def score(body: ScoreRequest, request: Request) -> Any:
        check_key(request)
        engine = get_engine()
        if not engine.can_score:
            raise ApiError(400, f"{model_name()} is not a reward model: it has no value head (train it with stage rm)",
                           "model")  # fmt: skip
        async with ticket():
            scores = await run_in_threadpool(engine.score, body.messages, body.max_length)
        return {"id": new_id("scoreval"), "object": "score.evaluation", "model": model_name(), "scores": scores}

    return app


class _Refused(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after


def serve_api(engine: Engine, settings: ApiSettings, base: Sampling) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO if settings.verbose else logging.WARNING, format="%(message)s")
    app = build_app(engine, settings, base)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info" if settings.verbose else "warning",
                access_log=settings.verbose)  # fmt: skip
