"""`luca serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with a web chat page at `/`.

What is notable:
- `/v1/models`, `/v1/completions`, `/v1/chat/completions`: streaming (server-sent events, with
  `stream_options.include_usage`) and not, `usage` counts, stop strings, temperature, top_p,
  max_tokens, seed, n=1; `top_k` and `repetition_penalty` as extensions. The official `openai`
  client works unchanged. `/openapi.json` and `/docs` describe it; `/health` shows the scheduler.
- Requests are validated by pydantic; every client error is an HTTP 400 (413 for a body over
  `max_body` bytes, 401 for a missing or wrong bearer key, 404 for an unknown model) with
  OpenAI's error shape, and a prompt or `max_tokens` that does not fit the context says by how much.
- Generation runs on one scheduler thread (`luca.scheduler`): continuous batching for the native
  engine (default) or a first-come-first-served queue. A client that disconnects cancels its
  request, which leaves the batch at the next step.
- User text is always encoded as plain text (`Tokenizer.encode` / `encode_chat`): a message that
  contains `<|im_start|>system` cannot forge a turn.
- Binds to 127.0.0.1 unless told otherwise; the API key is compared in constant time.
"""
# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime.
import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
import weakref
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Union

from luca.engine import Completion, SamplingConfig
from luca.errors import LucaError
from luca.scheduler import Backend, open_backend

WEB_DIR = Path(str(resources.files("luca") / "web"))
MAX_BODY = 1 << 20  # 1 MiB: far above any prompt that fits a compact model's context
DRAIN_FACTOR = 16  # a body up to 16 × max_body is read to its end (and dropped) before the 413
MAX_WAITING = 256  # requests queued beyond the running batch; more are turned away with 503
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


def _require_fastapi():
    from importlib.util import find_spec
    if not all(find_spec(m) for m in ("fastapi", "uvicorn", "pydantic")):
        raise LucaError("luca serve needs fastapi and uvicorn: pip install 'luca[serve]'")


# -- request schemas -----------------------------------------------------------------------------
def _schemas():
    from pydantic import BaseModel, ConfigDict, Field

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Sampling(BaseModel):
        # An unknown field is a 400, not silently ignored: a client asking for tools or a JSON
        # format must not get plain text as if it had been honoured.
        model_config = ConfigDict(extra="forbid")
        model: str = Field("", description="the served model's id (see /v1/models)")
        max_tokens: int | None = Field(None, ge=0, description="tokens to generate at most")
        temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens (0 = off)")
        repetition_penalty: float = Field(1.0, gt=0, description="extension")
        n: int = Field(1, ge=1, le=1, description="only 1 is supported")
        stop: Union[str, list[str], None] = Field(None, description="up to 4 stop strings")
        seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)
        stream: bool = False
        stream_options: StreamOptions | None = None
        clamp_max_tokens: bool = Field(False, description="extension: treat max_tokens as a cap and cut it to "
                                                           "what the context leaves instead of answering 400")
        logprobs: Any = Field(None, description="not supported")
        user: str | None = None
        frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: only 0 is accepted")
        presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: only 0 is accepted")
        logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported: only {}")

    class CompletionRequest(Sampling):
        prompt: Union[str, list[str]] = Field(..., description="one prompt (a list of exactly one is accepted)")
        echo: bool = False

    class ContentPart(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        role: Literal["system", "developer", "user", "assistant"]
        content: Union[str, list[ContentPart]]

    class ChatRequest(Sampling):
        messages: list[Message] = Field(..., min_length=1)
        max_completion_tokens: int | None = Field(None, ge=0)
        truncate_history: bool = Field(False, description="extension: drop the oldest turns (never the system "
                                                           "prompt or the last message) until a reply fits; the "
                                                           "count is in the X-Luca-Dropped-Messages header")

    return CompletionRequest, ChatRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- the served model ----------------------------------------------------------------------------
class Served:
    """A backend plus its scheduler: what the routes call."""

    def __init__(self, backend: Backend, model_id: str, scheduler: str | None = None, max_batch: int = 16):
        self.backend, self.model_id, self.tok = backend, model_id, backend.tok
        self.context_length = backend.context_length
        self.scheduler = backend.scheduler(scheduler, max_batch)
        self.stop_ids = {i for i in (self.tok.eot_id, self.tok.im_end_id) if i is not None}
        self.created = int(time.time())

    def sampling(self, req, prompt_len: int, default_max: int | None) -> SamplingConfig:
        """SamplingConfig of a request, or APIError(400) saying why it cannot fit."""
        if req.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported by this server", "logprobs")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop: at most 4 stop strings, got {len(stop)}", "stop")
        ctx = self.context_length
        if prompt_len >= ctx:
            raise APIError(400, f"the prompt is {prompt_len} tokens, but this model's context is {ctx} tokens "
                                f"(at most {ctx - 1} prompt tokens leave room for one new token)",
                           "messages" if hasattr(req, "messages") else "prompt", "context_length_exceeded")
        room = ctx - prompt_len
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if asked is not None and req.clamp_max_tokens:
            asked = min(asked, room)
        if asked is not None and asked > room:
            raise APIError(400, f"this model's context is {ctx} tokens; the prompt takes {prompt_len}, so "
                                f"max_tokens can be at most {room}, but {asked} was requested",
                           "max_tokens", "context_length_exceeded")
        max_new = asked if asked is not None else min(room, default_max or room)
        try:
            return SamplingConfig(max_new_tokens=max_new, temperature=req.temperature, top_k=req.top_k,
                                  top_p=req.top_p, repetition_penalty=req.repetition_penalty, stop=stop,
                                  seed=req.seed)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def fit_chat(self, msgs: list[dict], req) -> tuple[list[int], int]:
        """Ids of the chat; with `truncate_history`, the oldest turns dropped until a reply has room."""
        ids = self.tok.encode_chat(msgs, add_generation_prompt=True)
        if not req.truncate_history:
            return ids, 0
        asked = req.max_completion_tokens or req.max_tokens or 1
        need = max(1, min(asked, self.context_length // 4))
        head = 1 if msgs and msgs[0]["role"] == "system" else 0
        dropped = 0
        while len(ids) + need > self.context_length and len(msgs) - head > 1:
            msgs = msgs[:head] + msgs[head + 1:]
            dropped += 1
            ids = self.tok.encode_chat(msgs, add_generation_prompt=True)
        return ids, dropped

    def check_capacity(self) -> None:
        if self.scheduler.stats()["waiting"] >= MAX_WAITING:
            raise APIError(503, f"server busy: {MAX_WAITING} requests are already waiting; retry later",
                           code="server_busy")

    def check_model(self, name: str) -> None:
        if name and name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                           "model", "model_not_found")

    async def events(self, ids: list[int], s: SamplingConfig, request,
                     poll: bool = True) -> AsyncIterator[str | Completion]:
        """The request's events; cancels generation when the consumer stops or the client leaves.

        `poll=False` for streaming responses: Starlette already cancels those on a disconnect.
        """
        q: asyncio.Queue = asyncio.Queue()
        mailbox = _mailbox(asyncio.get_running_loop())
        r = self.scheduler.submit(ids, s, self.stop_ids, lambda ev: mailbox.post(q, ev))
        checked = time.monotonic()
        try:
            while True:
                ev = None
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                # Tokens may keep coming while nobody listens (a non-streaming client that gave
                # up): look at the connection at least twice a second either way.
                if ev is None or (poll and time.monotonic() - checked > 0.5):
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                    if ev is None:
                        continue
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if isinstance(ev, Completion):
                    return
        finally:
            r.cancel()  # a no-op once finished; otherwise the row leaves the batch at the next step


class _Mailbox:
    """Events from the scheduler thread to one event loop, one wake-up per burst.

    A decode step emits a piece for every active row; waking the loop once per step instead of
    once per row saves a self-pipe write and a loop iteration per row.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock = loop, [], threading.Lock()

    def post(self, q: asyncio.Queue, ev: Any) -> None:
        with self.lock:
            self.items.append((q, ev))
            first = len(self.items) == 1
        if first:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for q, ev in items:
            q.put_nowait(ev)


_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    mb = _MAILBOXES.get(loop)
    if mb is None:
        mb = _MAILBOXES[loop] = _Mailbox(loop)
    return mb


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# -- the app -------------------------------------------------------------------------------------
def create_app(served: Served, api_key: str | None = None, max_body: int = MAX_BODY):
    """The FastAPI application for one served model."""
    _require_fastapi()
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    CompletionRequest, ChatRequest = _schemas()
    app = FastAPI(title="luca", version="0.1.0",
                  description=f"OpenAI-compatible API serving `{served.model_id}` with luca.")

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        type_ = "authentication_error" if e.status == 401 else "invalid_request_error"
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(_error_body(e.message, type_, e.param, e.code), e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):  # unparsable body, unknown route, wrong method
        return JSONResponse(_error_body(str(e.detail)), e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        parts: dict[str, str] = {}  # one message per top-level field (a union reports each branch)
        for err in e.errors():
            if err.get("type") == "json_invalid":
                why = err.get("ctx", {}).get("error", "")
                return JSONResponse(_error_body(f"the request body is not valid JSON ({why})"), 400)
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            parts.setdefault(loc[0] if loc else "body", f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        msg = "; ".join(list(parts.values())[:3]) or "invalid request"
        return JSONResponse(_error_body(msg, param=next(iter(parts), None)), 400)

    async def auth(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "luca",
                "context_length": served.context_length, "backend": served.backend.name}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(auth)])
    async def get_model(model_id: str):
        served.check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.model_id, **served.scheduler.stats()}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request):
        served.check_model(body.model)
        served.check_capacity()
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: exactly one prompt per request, got {len(prompt)}", "prompt")
            prompt = prompt[0]
        if body.echo:
            raise APIError(400, "echo is not supported by this server", "echo")
        ids = served.tok.encode(prompt) or [served.tok.eot_id]
        s = served.sampling(body, len(ids), COMPLETIONS_DEFAULT_MAX_TOKENS)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": served.model_id}

        def choice(text: str, reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        if body.stream:
            usage_wanted = bool(body.stream_options and body.stream_options.include_usage)

            async def gen():
                try:
                    async for ev in served.events(ids, s, request, poll=False):
                        if isinstance(ev, Completion):
                            yield _sse({**base, "choices": [choice("", ev.finish_reason)]})
                            if usage_wanted:
                                yield _sse({**base, "choices": [], "usage": _usage(ev)})
                        else:
                            yield _sse({**base, "choices": [choice(ev, None)]})
                    yield "data: [DONE]\n\n"
                except Exception as e:
                    yield _sse(_error_body(str(e), "server_error"))
            return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        c = await _collect(served, ids, s, request)
        return {**base, "choices": [choice(c.text, c.finish_reason)], "usage": _usage(c)}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatRequest, request: Request):
        served.check_model(body.model)
        served.check_capacity()
        msgs = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                for m in body.messages]
        try:
            ids, dropped = served.fit_chat(msgs, body)
        except ValueError as e:  # a foreign tokenizer without ChatML markers
            raise APIError(400, f"this model cannot chat: {e}; use /v1/completions") from None
        s = served.sampling(body, len(ids), None)
        headers = {"Cache-Control": "no-cache", "X-Luca-Dropped-Messages": str(dropped)}
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.model_id}

        def chunk(delta: dict, reason: str | None) -> dict:
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        if body.stream:
            usage_wanted = bool(body.stream_options and body.stream_options.include_usage)

            async def gen():
                try:
                    yield _sse(chunk({"role": "assistant", "content": ""}, None))
                    async for ev in served.events(ids, s, request, poll=False):
                        if isinstance(ev, Completion):
                            yield _sse(chunk({}, ev.finish_reason))
                            if usage_wanted:
                                yield _sse({**base, "choices": [], "usage": _usage(ev)})
                        else:
                            yield _sse(chunk({"content": ev}, None))
                    yield "data: [DONE]\n\n"
                except Exception as e:
                    yield _sse(_error_body(str(e), "server_error"))
            return StreamingResponse(gen(), media_type="text/event-stream", headers=headers)

        c = await _collect(served, ids, s, request)
        return JSONResponse({**base, "object": "chat.completion",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                          "logprobs": None, "finish_reason": c.finish_reason}],
                             "usage": _usage(c)}, headers=headers)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/web", StaticFiles(directory=str(WEB_DIR)), name="web")
    return BodyLimit(app, max_body) if max_body else app


async def _collect(served: Served, ids, s, request) -> Completion:
    async for ev in served.events(ids, s, request):
        if isinstance(ev, Completion):
            return ev
    raise APIError(499, "client disconnected")  # nobody is listening any more


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413, chunked or not."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def __getattr__(self, name):  # keep `app.openapi()`, `app.routes`, ... reachable
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.limit:
            return await self._too_large(receive, send, 0, declared)
        body, more = bytearray(), True
        while more:  # read it all here, so a body without Content-Length is bounded too
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(receive, send, len(body), declared, more)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later: the disconnect message

        await self.app(scope, replay, send)

    async def _too_large(self, receive, send, seen: int, declared: int, more: bool = True):
        # Read (and drop) the rest of a moderately large body before answering: closing with unread
        # bytes makes the kernel reset the connection, and the client would never see the 413.
        # Past DRAIN_FACTOR × limit the connection is just closed after the answer.
        while more and max(seen, declared) <= DRAIN_FACTOR * self.limit:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            seen += len(msg.get("body", b""))
            more = msg.get("more_body", False)
        data = json.dumps(_error_body(f"request body is larger than {self.limit} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": data})


# -- running it ----------------------------------------------------------------------------------
def build(run_dir: str, backend: str = "native", scheduler: str | None = None, max_batch: int = 16,
          api_key: str | None = None, max_body: int = MAX_BODY, threads: int | None = None,
          gguf: str | None = None, say=None):
    """(app, served) for a run directory."""
    _require_fastapi()
    b = open_backend(run_dir, backend, threads=threads, gguf=gguf, say=say)
    served = Served(b, Path(run_dir).resolve().name, scheduler, max_batch)
    return create_app(served, api_key, max_body), served


class ServerThread:
    """uvicorn in a background thread on an already-bound socket (tests, benchmarks, notebooks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(run_dir: str, backend: str = "native", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, scheduler: str | None = None, max_batch: int = 16,
          max_body: int = MAX_BODY, threads: int | None = None, gguf: str | None = None, say=print) -> None:
    """Serve a run directory until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise LucaError("luca serve needs fastapi and uvicorn: pip install 'luca[serve]'") from None
    app, served = build(run_dir, backend, scheduler, max_batch, api_key, max_body, threads, gguf, say)
    if host not in LOOPBACK and not api_key:
        say(f"warning: serving on {host} without --api-key: anyone who can reach it can use it")
    shown = f"[{host}]" if ":" in host else host
    say(f"serving {served.model_id} ({backend}, {served.scheduler.name} scheduler, context {served.context_length}) "
        f"at http://{shown}:{port}/  (API: http://{shown}:{port}/v1, schema: /openapi.json)")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        served.scheduler.close()
