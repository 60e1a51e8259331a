"""`nano serve`'s API without a browser: the real LiteRT-LM engine on two tiny .litertlm bundles (tests/conftest.py's
`tiny_pair`), served by uvicorn on a real socket, read as server-sent events."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from nano.checkpoint import load_model_dir
from nano.config import TINY
from nano.sampling import Generator, SamplingConfig
from serve.app import create_app, model_names
from serve.engines import EngineModel
from serving import generate, nano_generate_greedy, open_stream, read_events, running, streamed_text

PROMPT, OTHER_PROMPT = "Hello, world", "def fibonacci(n):\n    return"
NEW = 24


def test_model_names_are_file_names_made_unique():
    assert model_names(["a/student-int4.litertlm", "b/student-int4.litertlm", "teacher.litertlm"]) == \
        ["student-int4", "student-int4-2", "teacher"]


@pytest.fixture(scope="module")
def server(tiny_pair):
    app = create_app([EngineModel(path, name=name, threads=1) for name, (_, path) in tiny_pair.items()])
    with running(app) as base:
        yield base, app.state.served


def _body(model="student", prompt=PROMPT, conversation="c", **settings):
    return {"model": model, "prompt": prompt, "conversation": conversation, "max_new_tokens": NEW, **settings}


@pytest.mark.slow
def test_models_are_described_by_name_and_bundle_not_path(server, tiny_pair):
    base, _ = server
    text = urllib.request.urlopen(base + "/api/models").read().decode()
    models = {m["name"]: m for m in json.loads(text)}
    assert list(models) == ["student", "teacher"]
    for name, (_, path) in tiny_pair.items():
        m = models[name]
        assert m["file_bytes"] == path.stat().st_size and m["context"] == 64 and m["quant"] == "float32"
        assert m["config_hash"] == TINY.hash and m["vocab_size"] == TINY.vocab_size and m["versions"]["jax"]
        assert str(path) not in text  # the page learns names, never the artifacts' paths


@pytest.mark.slow
def test_greedy_stream_equals_nano_generate(server, tiny_pair):
    """Each model streams, chunk by chunk, exactly `nano generate`'s greedy continuation of the same model directory;
    the final figures are the engine's own count."""
    base, _ = server
    texts = {}
    for name, (model_dir, _) in tiny_pair.items():
        status, events = generate(base, _body(model=name, conversation=f"greedy-{name}"))
        assert status == 200 and events[0]["type"] == "start"
        assert sum(e["type"] == "text" for e in events) > 1  # streamed, not sent at the end
        texts[name] = streamed_text(events)
        assert texts[name] == nano_generate_greedy(model_dir, PROMPT, NEW)
        done = events[-1]
        assert done["tokens"] == NEW and done["tokens_per_s"] > 0 and done["ttft_s"] > 0
        assert done["context_used"] == done["prompt_tokens"] + NEW
    assert texts["student"] != texts["teacher"]


@pytest.mark.slow
def test_concurrent_requests_to_one_model_queue_and_stay_apart(server, tiny_pair):
    """Two requests to one engine at once both finish, each with its own prompt's text (the queue runs them one
    after the other)."""
    base, served = server
    model_dir = tiny_pair["student"][0]
    want = {p: nano_generate_greedy(model_dir, p, NEW) for p in (PROMPT, OTHER_PROMPT)}
    assert want[PROMPT] != want[OTHER_PROMPT]
    got, before = {}, served["student"].counts["done"]

    def ask(prompt, conversation):
        got[prompt] = generate(base, _body(prompt=prompt, conversation=conversation))

    threads = [threading.Thread(target=ask, args=(p, f"concurrent-{i}")) for i, p in enumerate(want)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for prompt, (status, events) in got.items():
        assert status == 200 and streamed_text(events) == want[prompt]
    assert served["student"].counts["done"] == before + 2


@pytest.mark.slow
def test_a_conversation_keeps_its_context_and_sessions_stay_apart(server, tiny_pair):
    """Turn two of a conversation continues turn one (the JAX model on the same ids: BOS, prompt, answer, prompt),
    with another conversation run on the same engine in between."""
    base, _ = server
    model, tokenizer = load_model_dir(tiny_pair["student"][0])
    generator = Generator(model, SamplingConfig(temperature=0.0))
    first = generate(base, _body(conversation="talk", max_new_tokens=8))[1]
    generate(base, _body(prompt=OTHER_PROMPT, conversation="someone-else", max_new_tokens=8))
    second = generate(base, _body(prompt=" again", conversation="talk", max_new_tokens=8))[1]
    ids = [tokenizer.bos_id, *tokenizer.encode(PROMPT)]
    answer = generator.generate(ids, max_new_tokens=8, stop_ids=tokenizer.stop_ids)
    assert streamed_text(first) == tokenizer.decode(answer)
    follow = generator.generate(ids + answer + tokenizer.encode(" again"), max_new_tokens=8,
                                stop_ids=tokenizer.stop_ids)
    assert streamed_text(second) == tokenizer.decode(follow)
    assert second[-1]["context_used"] == len(ids) + 8 + len(tokenizer.encode(" again")) + 8


@pytest.mark.slow
def test_a_client_that_disconnects_stops_its_generation(server, tiny_pair, monkeypatch):
    """The tiny model decodes a whole answer in milliseconds, so its stream is slowed here (20 ms a chunk) to leave
    time to hang up mid-answer; the engine is then cancelled, and the next request runs normally."""
    base, served = server
    student = served["student"]
    model, open_conversation = student.model, student.model.open

    def slow_open(settings, **kwargs):
        conversation = open_conversation(settings, **kwargs)
        decode = conversation.session.run_decode_async

        def slow_decode():
            for response in decode():
                time.sleep(0.02)
                yield response

        conversation.session.run_decode_async = slow_decode
        return conversation

    monkeypatch.setattr(model, "open", slow_open)
    before = dict(student.counts)
    conn, response = open_stream(base, _body(conversation="leaves", max_new_tokens=40))
    events = read_events(response)
    assert next(events)["type"] == "start" and next(events)["type"] == "text"
    response.close()
    conn.close()
    deadline = time.monotonic() + 10
    while student.counts["cancelled"] == before.get("cancelled", 0):
        assert time.monotonic() < deadline, "the generation went on after its client left"
        time.sleep(0.05)
    assert student.counts["done"] == before.get("done", 0) and "leaves" not in student.conversations
    monkeypatch.undo()
    status, events = generate(base, _body(conversation="after"))
    assert status == 200 and streamed_text(events) == nano_generate_greedy(tiny_pair["student"][0], PROMPT, NEW)


@pytest.mark.slow
@pytest.mark.parametrize("body, status, message", [
    (_body(model="/tmp/student.litertlm"), 400, "never by path"),
    (_body(model="../teacher"), 400, "never by path"),
    (_body(model="nobody"), 404, "unknown model 'nobody': this server runs student, teacher"),
    (_body(prompt="Hello, world " * 20), 400, "exceed its context of 64 tokens"),
    (_body(max_new_tokens=64), 400, "exceed its context of 64 tokens"),
    (_body(max_new_tokens=0), 400, "max new tokens must be at least 1"),
    (_body(temperature=-1), 400, "temperature"),
    (_body(prompt=""), 400, "the prompt is empty"),
    (_body(conversation="../x"), 400, "conversation id"),
])
def test_bad_requests_are_refused_in_one_line(server, body, status, message):
    base, served = server
    got, error = generate(base, body)
    assert got == status and set(error) == {"error"} and message in error["error"], error
    assert "Traceback" not in error["error"] and "\n" not in error["error"]


@pytest.mark.slow
def test_a_request_that_is_not_json_is_refused(server):
    base, _ = server
    request = urllib.request.Request(base + "/api/generate", data=b"model=student", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 400 and json.loads(refused.value.read()) == {"error": "the request is not JSON"}
