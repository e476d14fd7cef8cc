"""The HTTP routes: OpenAI's /v1/models, /v1/completions, /v1/chat/completions, vLLM's adapter routes,
/health and /metrics, on FastAPI (Starlette + uvicorn, the stack vLLM serves its OpenAI API with).

FastAPI is imported when an app is created, not with this module, so that a missing ``deltatune[serve]``
extra is reported by ``deltatune serve`` with the install command rather than as an ImportError.

Handlers only parse, validate and translate: each request becomes a :class:`Sequence` handed to the
:class:`Engine`, whose thread alone touches the model; its events come back through an asyncio queue.
"""
# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations (``request: Request``),
# and as strings they would be looked up in this module's globals, where the lazily imported names are not.
import asyncio
import contextlib
import json
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from deltatune.serve import protocol as P
from deltatune.serve.engine import Engine
from deltatune.serve.protocol import APIError
from deltatune.serve.request import Event, QueueFull, Sequence
from deltatune.serve.sampling import SamplingParams
from deltatune.serving import BASE

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(engine: Engine, base_name: str, max_model_len: int, api_key: str | None = None,
               adapter_root: str | Path | None = None) -> "FastAPI":
    """The FastAPI app serving ``engine``; the engine starts with the app and drains when it stops.

    Args:
        base_name: the name under which requests reach the base model (no adapter).
        max_model_len: longest prompt + completion, in tokens.
        api_key: when set, every /v1 route needs ``Authorization: Bearer <api_key>``.
        adapter_root: /v1/load_lora_adapter only reads folders under it; None turns loading over HTTP off.
    """
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    root = Path(adapter_root).resolve() if adapter_root is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # uvicorn has let in-flight requests finish; the engine drains

    app = FastAPI(title="deltatune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    async def server_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)

    def sse(chunks: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>' "
                                "with the key the server was started with (--api-key)")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorised)])

    def adapter_for(model: str) -> str:
        if model == base_name:
            return BASE
        served = engine.served()
        if model in served:
            return model
        raise APIError(404, f"The model `{model}` does not exist. Available: {[base_name, *sorted(served)]}",
                       param="model", code="model_not_found")

    def sampling(body: P._Request, prompt_len: int, default_max: int, logprobs: int | None = None) -> SamplingParams:
        if prompt_len > max_model_len or (prompt_len == max_model_len and body.max_tokens is None):
            raise APIError(400, f"the prompt has {prompt_len} tokens, but this server's maximum context length is "
                                f"{max_model_len} tokens (--max-model-len); shorten the prompt", param="messages")
        asked = getattr(body, "max_new", None) or body.max_tokens
        if asked is not None and prompt_len + asked > max_model_len:
            raise APIError(400, f"this server's maximum context length is {max_model_len} tokens, but {prompt_len + asked} "
                                f"were requested ({prompt_len} in the prompt, {asked} in the completion); lower "
                                "max_tokens or shorten the prompt", param="max_tokens")
        try:
            return SamplingParams(
                max_tokens=asked or min(default_max, max_model_len - prompt_len),
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=body.stops, logprobs=logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def run(request: Request, adapter: str, prompt: list[int], params: SamplingParams,
                  stream: bool) -> AsyncIterator[Event]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:  # called on the scheduler thread
            loop.call_soon_threadsafe(queue.put_nowait, event)

        seq = Sequence(adapter, prompt, params, emit)
        try:
            engine.submit(seq)
        except QueueFull as e:
            engine.metrics.inc("deltatune_requests_total", outcome="rejected")
            raise APIError(429, f"the server is busy: {e}", code="queue_full") from None

        async def events() -> AsyncIterator[Event]:
            try:
                while True:
                    if stream:  # Starlette cancels a stream whose client left: the finally below runs
                        event = await queue.get()
                    else:
                        try:
                            event = await asyncio.wait_for(queue.get(), timeout=0.5)
                        except asyncio.TimeoutError:
                            if await request.is_disconnected():
                                return
                            continue
                    yield event
                    if event.kind != "text":
                        return
            finally:
                if not seq.done:  # the client left (or the handler failed): free its row
                    seq.cancelled = True  # the scheduler drops it before its next step
                    engine.metrics.inc("deltatune_requests_total", outcome="cancelled")

        return events()

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": base_name, "object": "model", "created": now, "owned_by": "deltatune", "root": base_name,
                 "parent": None}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "deltatune", "root": path,
                  "parent": base_name} for n, path in sorted(engine.served().items())]
        return {"object": "list", "data": data}

    @v1.post("/completions")
    async def completions(request: Request):
        body = P.parse(P.CompletionRequest, await request.body())
        adapter = adapter_for(body.model)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        ids = engine.codec.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        params = sampling(body, len(ids), 16, body.logprobs)  # OpenAI's default max_tokens for completions
        reply = _Reply("cmpl", body.model, chat=False, codec=engine.codec, logprobs=body.logprobs is not None)
        return await respond(request, body, adapter, ids, params, reply)

    async def respond(request: Request, body, adapter, ids, params, reply: "_Reply"):
        """Run the request and answer it: an SSE stream, or the whole reply."""
        events = await run(request, adapter, ids, params, body.stream)
        if body.stream:
            return sse(reply.stream(events, body.include_usage))
        return await reply.whole(events)

    @v1.post("/chat/completions")
    async def chat(request: Request):
        body = P.parse(P.ChatRequest, await request.body())
        adapter = adapter_for(body.model)
        try:
            ids = engine.codec.encode_chat([m.plain() for m in body.messages])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        except Exception as e:  # the template itself refused the messages (roles out of order, ...)
            raise APIError(400, f"the chat template could not render these messages: {e}", param="messages") from None
        params = sampling(body, len(ids), max_model_len)
        reply = _Reply("chatcmpl", body.model, chat=True, codec=engine.codec, logprobs=False)
        return await respond(request, body, adapter, ids, params, reply)

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = P.parse(P.LoadLoraRequest, await request.body())
        if root is None:
            raise APIError(403, "loading adapters over HTTP is off; start the server with --adapter-root DIR "
                                "(adapters under DIR may then be loaded)")
        path = Path(body.lora_path)
        path = (path if path.is_absolute() else root / path).resolve()
        if not path.is_relative_to(root):
            raise APIError(403, f"lora_path {body.lora_path!r} lies outside --adapter-root {str(root)!r}; only "
                                "folders under it may be loaded", param="lora_path")
        if body.lora_name in (base_name, BASE):
            raise APIError(400, f"lora_name {body.lora_name!r} is the base model's name; pick another", param="lora_name")
        try:
            await asyncio.wrap_future(engine.call(lambda: engine.load(body.lora_name, str(path))))
        except Exception as e:  # all or nothing: the reason goes back, the served set is unchanged
            raise APIError(400, f"could not load adapter {body.lora_name!r} from {str(path)!r}: {e} "
                                "(nothing was loaded; the served adapters are unchanged)", param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = P.parse(P.UnloadLoraRequest, await request.body())
        try:
            await asyncio.wrap_future(engine.call(lambda: engine.unload(body.lora_name)))
        except KeyError:
            raise APIError(404, f"no adapter named {body.lora_name!r} is loaded; loaded: {sorted(engine.served())}",
                           param="lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    app.include_router(v1)

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


class _Reply:
    """One request's answer in OpenAI's format, whole or as server-sent chunks."""

    def __init__(self, prefix: str, model: str, chat: bool, codec, logprobs: bool) -> None:
        self.id, self.model, self.chat, self.codec = f"{prefix}-{secrets.token_hex(12)}", model, chat, codec
        self.logprobs, self.created = logprobs, int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _lp(self, choices, offset: int = 0) -> dict | None:
        if not self.logprobs:
            return None
        pieces = self.codec.pieces([c.token for c in choices])
        offsets = [offset + sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
        return {"tokens": pieces, "token_logprobs": [c.logprob for c in choices],
                "top_logprobs": [{self.codec.pieces([t])[0]: lp for t, lp in c.top} for c in choices],
                "text_offset": offsets}

    def _choice(self, text: str, finish: str | None, lp: dict | None, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return {"index": 0, "finish_reason": finish, "logprobs": None,
                "delta": ({"role": "assistant", "content": text} if first else {"content": text} if text else {})}

    async def whole(self, events: AsyncIterator[Event]) -> dict:
        texts, choices, done = [], [], None
        async with contextlib.aclosing(events):  # its finally runs now, not when the generator is collected
            async for event in events:
                if event.kind == "error":
                    raise APIError(500, f"generation failed: {event.error}")
                texts.append(event.text)
                choices += event.choices
                done = event
        if done is None or done.kind != "done":
            raise APIError(500, "the request was cancelled")
        text = "".join(texts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": done.finish_reason} if self.chat else
                  {"index": 0, "text": text, "logprobs": self._lp(choices), "finish_reason": done.finish_reason})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": done.usage.as_dict()}

    def _chunk(self, choices: list, usage=None) -> str:
        body = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""),
                "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage.as_dict()
        return f"data: {json.dumps(body)}\n\n"

    async def stream(self, events: AsyncIterator[Event], include_usage: bool) -> AsyncIterator[str]:
        if self.chat:
            yield self._chunk([self._choice("", None, None, first=True)])
        offset = 0
        async with contextlib.aclosing(events):
            async for event in events:
                if event.kind == "error":
                    yield f"data: {json.dumps(APIError(500, f'generation failed: {event.error}').body())}\n\n"
                    break
                if event.kind == "text" and (event.text or self.logprobs):
                    yield self._chunk([self._choice(event.text, None, self._lp(event.choices, offset))])
                    offset += len(event.text)
                if event.kind == "done":
                    yield self._chunk([self._choice("", event.finish_reason, None)])
                    if include_usage:
                        yield self._chunk([], usage=event.usage)
        yield "data: [DONE]\n\n"

