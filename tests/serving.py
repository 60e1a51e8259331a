"""Helpers for the `nano serve` tests: the app on a real socket (uvicorn in a thread), its server-sent events read
with the standard library, and `nano generate`'s greedy text to compare with."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

from click.testing import CliRunner

from cli.main import cli


@contextlib.contextmanager
def running(app):
    """The base URL of `app` served on a free port of 127.0.0.1 until the block ends."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def open_stream(base: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=60)
    conn.request("POST", "/api/generate", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def read_events(response: http.client.HTTPResponse):
    """Yield each server-sent event's JSON until the stream ends."""
    for line in response:
        if line.startswith(b"data: "):
            yield json.loads(line[len(b"data: "):])


def generate(base: str, body: dict) -> tuple[int, list[dict] | dict]:
    """(status, every event) of one request, or (status, the error JSON) when it is refused."""
    conn, response = open_stream(base, body)
    try:
        if response.status != 200:
            return response.status, json.loads(response.read())
        return response.status, list(read_events(response))
    finally:
        conn.close()


def streamed_text(events: list[dict]) -> str:
    assert events[-1]["type"] == "done", events[-1]
    return "".join(e["text"] for e in events if e["type"] == "text")


@functools.cache  # each call loads and compiles the model: a few seconds
def nano_generate_greedy(model_dir, prompt: str, max_new_tokens: int) -> str:
    """`nano generate MODEL --prompt PROMPT --temperature 0`'s text (its stdout without the final newline)."""
    result = CliRunner().invoke(cli, ["generate", str(model_dir), "--prompt", prompt, "--temperature", "0",
                                      "--max-new-tokens", str(max_new_tokens)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]
