"""A .litertlm in the LiteRT-LM engine, as `nano chat` and `nano serve` run it, and the queue `nano serve` puts in
front of each engine.

A conversation is one engine session: the engine keeps its KV cache between turns, so a follow-up prefills only its
own text. The engine takes and returns text, and a streamed chunk is whatever text a decode step made printable (a
character split over byte pieces arrives at once), so live token counts are chunks and a turn's final figures are
the engine's own (its benchmark counters).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from nano.errors import NanoError
from nano.sampling import SamplingConfig

MAX_CONVERSATIONS = 8  # per served model; past this the least recently used one's session is closed
CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
log = logging.getLogger("nano.serve")


class RequestError(NanoError):
    """A request refused, with the one line the page shows and an HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def too_long(name: str, used: int, tokens: int, max_new_tokens: int, context: int) -> str:
    """The one line that refuses a turn the model's context cannot hold."""
    held = f"{used} tokens already in this conversation + " if used else ""
    fix = "start a new conversation, shorten" if used else "shorten"
    return (f"too long for {name}: {held}a prompt of {tokens} tokens + {max_new_tokens} new tokens exceed its context "
            f"of {context} tokens: {fix} the prompt or lower max new tokens")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a conversation samples. Fixed for its life: the engine takes them when it opens the session."""

    sampling: SamplingConfig = SamplingConfig(temperature=0.0)
    max_new_tokens: int = 128
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise RequestError(f"max new tokens must be at least 1, got {self.max_new_tokens}")


def sampler_config(settings: Settings, vocab_size: int):
    """`nano generate`'s sampling in the engine's terms. The CPU engine samples TOP_P only: greedy is k = 1, and the
    Python API fills an unset top_k with 1 and top_p with 0.95, so "the whole distribution" is spelled out."""
    import litert_lm

    s = settings.sampling
    if s.temperature == 0:
        return litert_lm.SamplerConfig(top_k=1, seed=settings.seed)
    return litert_lm.SamplerConfig(top_k=s.top_k or vocab_size, top_p=s.top_p or 1.0, temperature=s.temperature,
                                   seed=settings.seed)


@dataclasses.dataclass
class Turn:
    """One answer's figures: live while it streams (chunks), the engine's own when it is done."""

    prompt_tokens: int
    started: float = dataclasses.field(default_factory=time.perf_counter)
    first: float | None = None
    chunks: int = 0
    tokens: int | None = None
    tokens_per_s: float | None = None
    cancelled: bool = False

    def figures(self) -> dict:
        now = time.perf_counter()
        rate = self.tokens_per_s
        if rate is None and self.first is not None and self.chunks > 1:
            rate = (self.chunks - 1) / (now - self.first)
        return {"ttft_s": None if self.first is None else self.first - self.started,
                "tokens": self.chunks if self.tokens is None else self.tokens, "tokens_per_s": rate,
                "prompt_tokens": self.prompt_tokens}


@dataclasses.dataclass
class Conversation:
    session: object
    settings: Settings
    used: int = 0  # tokens in the session's context: BOS, every prompt and every answer
    turn: Turn | None = None

    def close(self) -> None:
        self.session.close()


class EngineModel:
    """One .litertlm loaded in the LiteRT-LM engine (CPU, XNNPACK), with what the page shows about it."""

    def __init__(self, path: str | Path, *, name: str | None = None, threads: int | None = None):
        import litert_lm

        from bench.run import tokenizer_of
        from export.bundle import read_provenance
        from export.integrity import check_artifact
        from export.runtime import quiet_native_stderr

        path = Path(path)
        if not path.is_file():
            raise NanoError(f"{path} does not exist or is not a file")
        if path.suffix != ".litertlm":
            raise NanoError(f"{path} is not a .litertlm bundle: the LiteRT-LM engine runs bundles "
                            f"(`nano export MODEL --out NAME.litertlm`)")
        self.name, self.path = name or path.stem, path
        litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
        check_artifact(path)  # a damaged or altered bundle: one line here, never a signal in the engine
        try:
            provenance = read_provenance(path)
            self.tokenizer = tokenizer_of(path, None)
        except NanoError:
            raise
        except Exception as e:  # noqa: BLE001 — whatever the reader trips on, the file is no bundle it can read
            raise NanoError(f"{path} is not a readable .litertlm bundle ({e})") from None
        # The engine writes an XNNPACK weight cache beside the model unless given a folder: keep artifacts untouched.
        self._cache = tempfile.TemporaryDirectory(prefix="nano-serve-")
        try:
            with quiet_native_stderr(), litert_lm.ModelInfo(str(path)) as info:
                self.context = info.max_context_tokens
            backend = litert_lm.Backend.CPU(thread_count=threads or os.cpu_count())
            # enable_benchmark: the engine counts each turn's tokens and rates, which the figures report.
            with quiet_native_stderr():  # its load logs every accelerator it looks for; a failure still raises
                self.engine = litert_lm.Engine(str(path), backend=backend, cache_dir=self._cache.name,
                                               enable_benchmark=True)
        except RuntimeError as e:
            self._cache.cleanup()
            raise NanoError(f"{path}: the LiteRT-LM engine cannot load it ({e})") from None
        config = provenance.get("config") or {}
        self.info = {"name": self.name, "file_bytes": path.stat().st_size, "context": self.context,
                     "quant": provenance.get("quant", "unknown"), "quant_method": provenance.get("quant_method"),
                     "source": provenance.get("source"), "config_hash": provenance.get("config_hash"),
                     "layers": config.get("num_layers"), "d_model": config.get("d_model"),
                     "vocab_size": self.tokenizer.vocab_size, "versions": provenance.get("versions") or {}}

    def open(self, settings: Settings, *, template: bool = False) -> Conversation:
        """A new conversation. `template`: the engine applies the bundle's own prompt template (nano's bundles, made
        from base models, declare none, so text reaches the model as written either way)."""
        session = self.engine.create_session(apply_prompt_template=template, max_output_tokens=settings.max_new_tokens,
                                             sampler_config=sampler_config(settings, self.tokenizer.vocab_size))
        return Conversation(session, settings)

    def check(self, prompt: str, settings: Settings, used: int = 0) -> int:
        """The tokens `prompt` adds to a conversation holding `used`; refuses a turn the context cannot hold."""
        if not prompt:
            raise RequestError("the prompt is empty")
        tokens = len(self.tokenizer.encode(prompt)) + (0 if used else 1)  # the engine puts BOS before the first turn
        if used + tokens + settings.max_new_tokens > self.context:
            raise RequestError(too_long(self.name, used, tokens, settings.max_new_tokens, self.context))
        return tokens

    def turn(self, conversation: Conversation, prompt: str, prompt_tokens: int, *,
             cancelled: threading.Event | None = None) -> Iterator[str]:
        """Prefill `prompt` into the conversation, then yield the answer's text as it streams; `conversation.turn`
        holds the figures. A set `cancelled` (or closing this generator) stops the engine: the conversation is then
        half-written and the caller drops it."""
        session, turn = conversation.session, Turn(prompt_tokens)
        conversation.turn, finished = turn, False
        try:
            session.run_prefill([prompt])
            chunks = session.run_decode_async()
            try:
                for response in chunks:
                    if cancelled is not None and cancelled.is_set():
                        turn.cancelled = True
                        return
                    turn.first, turn.chunks = turn.first or time.perf_counter(), turn.chunks + 1
                    yield response.texts[0]
                finished = True
            finally:
                if not finished:
                    session.cancel_process()
                    for _ in chunks:  # the engine's decode thread calls back into `chunks`: let it end first
                        pass
            info = session.get_benchmark_info()
            turn.tokens, turn.tokens_per_s = info.last_decode_token_count, info.last_decode_tokens_per_second
            conversation.used += prompt_tokens + info.last_decode_token_count
        except RuntimeError as e:  # the engine's failures come as RuntimeError with its own one line
            raise NanoError(f"{self.name}: the engine failed ({e})") from None

    def close(self) -> None:
        self.engine.close()
        self._cache.cleanup()


class ServedModel:
    """A model behind the web page: a queue of one worker thread in front of its engine (requests run one at a time,
    in arrival order, rather than over each other) and its conversations, each an engine session."""

    def __init__(self, model: EngineModel):
        self.model = model
        self.queue = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{model.name}")
        self.conversations: collections.OrderedDict[str, Conversation] = collections.OrderedDict()
        self.lock = threading.Lock()  # the page's thread reads conversations to check lengths; the worker writes
        self.counts = collections.Counter()  # finished requests by outcome: done, cancelled, failed

    def check(self, conversation_id: str, prompt: str, settings: Settings) -> int:
        if not CONVERSATION_ID.fullmatch(conversation_id):
            raise RequestError("a conversation id is 1-64 letters, digits, '-' or '_'")
        with self.lock:
            conversation = self.conversations.get(conversation_id)
        if conversation is not None and conversation.settings != settings:
            raise RequestError("a conversation keeps the settings it started with: start a new conversation")
        return self.model.check(prompt, settings, conversation.used if conversation else 0)

    def run(self, conversation_id: str, prompt: str, prompt_tokens: int, settings: Settings,
            emit: Callable[[dict], None], cancelled: threading.Event) -> None:
        """One request, on the queue's thread: events `start`, `text` (with live figures), then `done` or `error`."""
        if cancelled.is_set():  # its client left while it waited
            self.counts["cancelled"] += 1
            return
        try:
            emit({"type": "start"})
            conversation = self._conversation(conversation_id, settings)
            for text in self.model.turn(conversation, prompt, prompt_tokens, cancelled=cancelled):
                emit({"type": "text", "text": text, **conversation.turn.figures()})
            if conversation.turn.cancelled:
                self._drop(conversation_id)
                self.counts["cancelled"] += 1
                return
            emit({"type": "done", **conversation.turn.figures(), "context_used": conversation.used})
            self.counts["done"] += 1
        except Exception as e:  # noqa: BLE001 — the page gets one line, the server's log the traceback
            self._drop(conversation_id)
            self.counts["failed"] += 1
            if not isinstance(e, NanoError):
                log.exception("request to %s failed", self.model.name)
            emit({"type": "error", "message": str(e) if isinstance(e, NanoError) else
                  f"{self.model.name}: internal error ({type(e).__name__}); see the server's log"})

    def _conversation(self, conversation_id: str, settings: Settings) -> Conversation:
        with self.lock:
            conversation = self.conversations.pop(conversation_id, None)
            if conversation is None:
                conversation = self.model.open(settings)
            self.conversations[conversation_id] = conversation  # most recently used last
            while len(self.conversations) > MAX_CONVERSATIONS:
                self.conversations.popitem(last=False)[1].close()
            return conversation

    def _drop(self, conversation_id: str) -> None:
        with self.lock:
            conversation = self.conversations.pop(conversation_id, None)
        if conversation is not None:
            conversation.close()

    def close(self) -> None:
        self.queue.shutdown(wait=True, cancel_futures=True)
        for conversation in self.conversations.values():
            conversation.close()
        self.conversations.clear()
        self.model.close()
