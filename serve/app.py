"""`nano serve`: one page (serve/static) that sends a prompt to one model or two side by side and streams their
answers, over a small JSON + server-sent-events API:

    GET  /api/models     what each served model is: name, file size, quantization, context, provenance
    POST /api/generate   {"model", "prompt", "conversation", "max_new_tokens", "temperature", "top_k", "top_p"}
                         → text/event-stream of {"type": "start" | "text" | "done" | "error", ...}

The page names models only by the names given at start-up (never a path); a refused request answers 4xx with
{"error": one line}, a failure during generation an `error` event; neither carries a traceback. A client that
disconnects cancels its response, which stops its generation (or drops it from the queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from pathlib import Path

from nano.errors import NanoError
from nano.sampling import SamplingConfig
from serve.engines import EngineModel, RequestError, ServedModel, Settings

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20  # bytes: more than any context here holds as text


def model_names(paths: list[str | Path]) -> list[str]:
    """Each artifact's name on the page: its file name without .litertlm, made unique with -2, -3, ..."""
    names: list[str] = []
    for path in paths:
        stem, name, i = Path(path).stem, Path(path).stem, 1
        while name in names:
            i += 1
            name = f"{stem}-{i}"
        names.append(name)
    return names


def create_app(models: list[EngineModel]):
    """The ASGI app serving `models` (already loaded); it closes them when the server stops."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    served = {m.name: ServedModel(m) for m in models}

    async def index(request):
        return FileResponse(STATIC / "index.html")

    async def list_models(request):
        return JSONResponse([s.model.info for s in served.values()])

    async def generate(request):
        try:
            target, conversation_id, prompt, settings = _parse(await _json(request), served)
            prompt_tokens = target.check(conversation_id, prompt, settings)
        except RequestError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        loop, events, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def emit(event: dict) -> None:  # called on the engine's queue thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
                loop.call_soon_threadsafe(events.put_nowait, event)

        loop.run_in_executor(target.queue, target.run, conversation_id, prompt, prompt_tokens, settings, emit,
                             cancelled)
        return StreamingResponse(_stream(events, cancelled), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.served = served  # tests read the queues' counts
        yield
        for s in served.values():
            s.close()

    return Starlette(routes=[Route("/", index), Route("/api/models", list_models),
                             Route("/api/generate", generate, methods=["POST"]),
                             Mount("/static", StaticFiles(directory=STATIC), name="static")], lifespan=lifespan)


async def _stream(events: asyncio.Queue, cancelled: threading.Event):
    try:
        while True:
            event = await events.get()
            yield f"data: {json.dumps(event)}\n\n"
            if event["type"] in ("done", "error"):
                return
    finally:  # also when the client disconnects: Starlette cancels the response, and this stops the engine
        cancelled.set()


async def _json(request) -> dict:
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise RequestError("the request is too large", status=413)
    body = await request.body()
    if len(body) > MAX_BODY:
        raise RequestError("the request is too large", status=413)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("the request is not JSON") from None
    if not isinstance(data, dict):
        raise RequestError("the request is not a JSON object")
    return data


def _parse(data: dict, served: dict[str, ServedModel]) -> tuple[ServedModel, str, str, Settings]:
    name, available = data.get("model"), ", ".join(served)
    if not isinstance(name, str) or "/" in name or "\\" in name or name.endswith(".litertlm"):
        raise RequestError(f"models are chosen by name among those this server started with ({available}), "
                           f"never by path")
    if name not in served:
        raise RequestError(f"unknown model {name!r}: this server runs {available}", status=404)
    prompt, conversation = data.get("prompt"), data.get("conversation")
    if not isinstance(prompt, str) or not isinstance(conversation, str):
        raise RequestError("prompt and conversation must be strings")
    try:
        sampling = SamplingConfig(temperature=_number(data, "temperature", float, 0.0),
                                  top_k=_number(data, "top_k", int, None), top_p=_number(data, "top_p", float, None))
        settings = Settings(sampling, max_new_tokens=_number(data, "max_new_tokens", int, 128),
                            seed=_number(data, "seed", int, 0))
    except NanoError as e:
        raise RequestError(str(e)) from None
    return served[name], conversation, prompt, settings


def _number(data: dict, key: str, kind: type, default):
    value = data.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise RequestError(f"{key.replace('_', ' ')} must be {'an integer' if kind is int else 'a number'}")
    return kind(value)


def serve(artifacts: list[str], *, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None) -> None:
    """Load one engine per artifact, then serve the page until interrupted."""
    import uvicorn

    from nano.ui import console, status

    models = []
    for path, name in zip(artifacts, model_names(artifacts)):
        with status(f"loading {path} as {name!r}"):
            models.append(EngineModel(path, name=name, threads=threads))
    console.print(f"open http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(create_app(models), host=host, port=port, log_level="warning")
