"""`nano chat`: a conversation in the terminal with a .litertlm in the LiteRT-LM engine, or with a model directory in
JAX (nano.sampling's Generator, as `nano generate`).

Gemma's turn template (`<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`) wraps each message when
the model has one: in JAX, when the tokenizer holds both turn pieces (they are control pieces, so the ids are put
in directly; text cannot reach them). The engine takes text only, so a .litertlm gets the template its bundle
declares, applied by the engine; nano's bundles, made from base models, declare none. `raw` skips templates: each
message then continues the text so far.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Iterator

from nano.errors import NanoError
from serve.engines import EngineModel, Settings, too_long

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"


@dataclasses.dataclass(frozen=True)
class Figures:
    tokens: int
    ttft_s: float | None
    tokens_per_s: float | None


class EngineChat:
    """A conversation with a .litertlm: one engine session, replaced on reset."""

    def __init__(self, path: str, settings: Settings, *, raw: bool = False, threads: int | None = None):
        self.model, self.settings, self.raw = EngineModel(path, threads=threads), settings, raw
        info = self.model.info
        self.title = f"{self.model.name} (LiteRT-LM engine, {info['quant']}, context {self.model.context})"
        self.mode = "plain continuation" if raw else "the bundle's prompt template (nano's declare none: plain text)"
        self.conversation, self.figures = None, None
        self.reset()

    def reset(self) -> None:
        if self.conversation is not None:
            self.conversation.close()
        self.conversation = self.model.open(self.settings, template=not self.raw)

    def reply(self, text: str) -> Iterator[str]:
        tokens = self.model.check(text, self.settings, self.conversation.used)
        try:
            yield from self.model.turn(self.conversation, text, tokens)
        except BaseException:  # an engine failure or Ctrl-C leaves the session half-written
            self.reset()
            raise
        f = self.conversation.turn.figures()
        self.figures = Figures(f["tokens"], f["ttft_s"], f["tokens_per_s"])

    def close(self) -> None:
        self.conversation.close()
        self.model.close()


class JaxChat:
    """A conversation with a model directory in JAX: the token history, prefilled again each turn."""

    def __init__(self, model: str, settings: Settings, *, raw: bool = False, dtype=None):
        import jax.numpy as jnp

        from nano.resolve import load_model
        from nano.sampling import Generator

        net, self.tokenizer = load_model(model, dtype=dtype or jnp.float32)
        self.generator, self.settings = Generator(net, settings.sampling), settings
        sp = self.tokenizer.sp
        self.turn_ids = [sp.piece_to_id(p) for p in (START_OF_TURN, END_OF_TURN)]
        self.template = not raw and sp.unk_id() not in self.turn_ids
        self.name, self.context = model, net.config.max_seq_len
        self.title = f"{model} (JAX, context {self.context})"
        self.mode = "Gemma's turn template" if self.template else "plain continuation"
        self.figures = None
        self.reset()

    def reset(self) -> None:
        self.history, self.turns = [self.tokenizer.bos_id], 0

    def _wrap(self, text: str) -> list[int]:
        encode, (start, end) = self.tokenizer.encode, self.turn_ids
        if not self.template:
            return encode(text)
        return [start, *encode("user\n" + text), end, *encode("\n"), start, *encode("model\n")]

    def reply(self, text: str) -> Iterator[str]:
        from nano.sampling import TextStream

        ids, stream = self.history + self._wrap(text), TextStream(self.tokenizer)
        if len(ids) + self.settings.max_new_tokens > self.context:
            used = len(self.history) if self.turns else 0  # BOS counts with the first prompt, as in the engine
            raise NanoError(too_long(self.name, used, len(ids) - used, self.settings.max_new_tokens, self.context))
        started, first = time.perf_counter(), None
        tokens = self.generator.stream(ids, max_new_tokens=self.settings.max_new_tokens,
                                       seed=self.settings.seed + self.turns, stop_ids=self.tokenizer.stop_ids)
        for token in tokens:
            first = first or time.perf_counter()
            yield stream.push(token)
        yield stream.flush()
        n, end = len(stream.ids), self.turn_ids[1]
        self.history = ids + stream.ids + ([end, *self.tokenizer.encode("\n")] if self.template else [])
        self.turns += 1
        rate = (n - 1) / (time.perf_counter() - first) if n > 1 else None
        self.figures = Figures(n, None if first is None else first - started, rate)

    def close(self) -> None:
        pass


def open_chat(target: str, settings: Settings, *, raw: bool = False, threads: int | None = None, dtype=None):
    """An EngineChat for a .litertlm, a JaxChat for a model directory or preset name."""
    if target.endswith(".litertlm"):
        return EngineChat(target, settings, raw=raw, threads=threads)
    if target.endswith(".tflite"):
        raise NanoError(f"{target}: a bare .tflite carries no tokenizer or metadata; chat with its .litertlm bundle")
    return JaxChat(target, settings, raw=raw, dtype=dtype)


def run_chat(chat, *, read=input, out=sys.stdout) -> None:
    """The loop: read a message, stream the answer, print its figures; `/reset` starts over; EOF quits."""
    from rich.markup import escape

    from nano.ui import console

    console.print(f"[bold]{escape(chat.title)}[/] · {chat.mode} · /reset starts over, Ctrl-D quits")
    while True:
        try:
            text = read("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if text.strip() == "/reset":
            chat.reset()
            console.print("[dim](new conversation)[/]")
            continue
        if not text.strip():
            continue
        try:
            for piece in chat.reply(text):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write("\n")
            chat.reset()
            console.print("[dim](stopped; new conversation)[/]")
            continue
        except NanoError as e:
            out.write("\n")
            console.print(f"[red]{escape(str(e))}[/]")
            continue
        out.write("\n")
        f = chat.figures
        first = "" if f.ttft_s is None else f", first after {f.ttft_s:.2f} s"
        rate = "" if f.tokens_per_s is None else f", {f.tokens_per_s:.1f} tokens/s"
        console.print(f"[dim]{f.tokens} tokens{first}{rate}[/]")
