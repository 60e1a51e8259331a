"""`nano chat` in a pseudo-terminal, as a person runs it: a prompt, the streamed answer (compared with the JAX model's
greedy tokens), a follow-up that continues the conversation, `/reset`, a too-long prompt, Ctrl-D. Both back-ends: a
.litertlm in the LiteRT-LM engine and a model directory in JAX. Gemma's turn template is checked apart, in-process."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nano.checkpoint import load_model_dir
from nano.sampling import Generator, SamplingConfig

NANO = Path(sys.executable).parent / "nano"
PROMPT, NEW = "Hello, world", 12
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>]")
FIGURES = re.compile(r"\n(\d+) tokens, first after [\d.]+ s(?:, [\d.]+ tokens/s)?\n")


class Terminal:
    """`nano ARGS` on a pseudo-terminal: write lines as typed, read what the screen shows."""

    def __init__(self, *args):
        master, slave = os.openpty()
        env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "TERM": "xterm"}
        self.proc = subprocess.Popen([str(NANO), *map(str, args)], stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.fd, self.screen = master, ""

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def expect(self, pattern: re.Pattern | str, timeout: float = 120) -> re.Match:
        """Read until `pattern` matches what came since the last match; consume up to its end."""
        pattern = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while not (match := pattern.search(self.screen)):
            assert time.monotonic() < deadline, f"waited for {pattern.pattern!r}; the screen shows {self.screen!r}"
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # the process ended and closed the terminal
                    data = b""
                assert data or self.proc.poll() is None, f"nano exited; the screen shows {self.screen!r}"
                self.screen += ANSI.sub("", data.decode(errors="replace")).replace("\r\n", "\n")
        self.screen = self.screen[match.end():]
        return match

    def answer(self, prompt: str) -> tuple[str, int]:
        """Type `prompt`; (the streamed answer, its token count from the figures line)."""
        self.expect("> ")
        self.type(prompt)
        self.expect(prompt + "\n")  # the terminal's echo
        figures = self.expect(FIGURES)
        return figures.string[:figures.start()], int(figures.group(1))

    def close(self) -> int:
        try:
            return self.proc.wait(30)
        finally:
            os.close(self.fd)


def _greedy(model_dir, turns: int) -> list[str]:
    """The JAX model's greedy answers to PROMPT typed `turns` times in one conversation (plain continuation)."""
    model, tokenizer = load_model_dir(model_dir)
    generator, ids, answers = Generator(model, SamplingConfig(temperature=0.0)), [tokenizer.bos_id], []
    for _ in range(turns):
        ids += tokenizer.encode(PROMPT)
        answer = generator.generate(ids, max_new_tokens=NEW, stop_ids=tokenizer.stop_ids)
        answers.append(tokenizer.decode(answer))
        ids += answer
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["litert-lm", "jax"])
def test_chat_in_a_terminal(backend, tiny_pair):
    model_dir, artifact = tiny_pair["student"]
    first, follow_up = _greedy(model_dir, 2)
    assert first != follow_up  # so the second answer shows the first turn is still in context
    term = Terminal("chat", artifact if backend == "litert-lm" else model_dir, "--temperature", 0,
                    "--max-new-tokens", NEW)
    term.expect("LiteRT-LM engine, float32, context 64" if backend == "litert-lm" else "(JAX, context 256)")
    term.expect("plain")  # the tiny tokenizer has no turn pieces; nano's bundles declare no template
    assert term.answer(PROMPT) == (first, NEW)
    assert term.answer(PROMPT) == (follow_up, NEW)
    term.expect("> ")
    term.type("/reset")
    term.expect("(new conversation)")
    assert term.answer(PROMPT) == (first, NEW)
    term.expect("> ")
    term.type(PROMPT * 40)
    term.expect(re.compile(r"too long for \S+: \d+ tokens already in this conversation \+ a prompt of \d+ tokens"))
    term.expect("> ")
    os.write(term.fd, b"\x04")  # Ctrl-D
    assert term.close() == 0


@pytest.mark.slow
def test_jax_chat_wraps_turns_in_gemmas_template(tmp_path, tiny_model):
    """With `<start_of_turn>` and `<end_of_turn>` in the vocabulary (control pieces, as in Gemma's), each message
    goes in as user turn + model turn, the answer stops at `<end_of_turn>` or the limit, and the turn is closed in
    the history; --raw leaves the text as typed."""
    import io

    import sentencepiece as spm

    from hf_tiny import training_text
    from nano.checkpoint import save_model
    from nano.tokenizer import Tokenizer
    from serve.chat import JaxChat
    from serve.engines import Settings

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_text()), model_writer=proto, vocab_size=512,
                                   model_type="bpe", byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   control_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2)
    tokenizer = Tokenizer(proto.getvalue())
    model_dir = save_model(tiny_model, tokenizer, tmp_path / "model")
    start, end = tokenizer.sp.piece_to_id("<start_of_turn>"), tokenizer.sp.piece_to_id("<end_of_turn>")
    assert tokenizer.encode("<start_of_turn>") != [start]  # text cannot reach it: ids go in directly
    settings = Settings(SamplingConfig(temperature=0.0), max_new_tokens=6)
    chat = JaxChat(str(model_dir), settings)
    assert chat.template and chat.mode == "Gemma's turn template"
    text = "".join(chat.reply("hi"))
    prompt = [tokenizer.bos_id, start, *tokenizer.encode("user\nhi"), end, *tokenizer.encode("\n"), start,
              *tokenizer.encode("model\n")]
    answer = Generator(tiny_model, settings.sampling).generate(prompt, max_new_tokens=6,
                                                               stop_ids=tokenizer.stop_ids)
    assert end in tokenizer.stop_ids and text == tokenizer.decode(answer)
    assert chat.history == prompt + answer + [end, *tokenizer.encode("\n")]
    raw = JaxChat(str(model_dir), settings, raw=True)
    "".join(raw.reply("hi"))
    assert not raw.template and raw.history[:1 + len(tokenizer.encode("hi"))] == [tokenizer.bos_id,
                                                                                  *tokenizer.encode("hi")]
