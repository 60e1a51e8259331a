"""Small model directories the export tests write out and read back (tests/test_gguf_export.py,
tests/test_safetensors_export.py), and the logits they compare.

Parameters are seeded and made to look trained rather than freshly initialised: norm scales spread over [0.5, 3)
(not the initial 1.0, so a lost or doubled `+1` shows) and a unit-scale embedding (logits of tens, where the
softcap bends them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from hf_tiny import TOKENS, training_text
from nano.checkpoint import flat_params, load_config, load_model_dir, save_model_dir
from nano.config import TINY, ModelConfig
from nano.model import init_model
from nano.tokenizer import Tokenizer

# Every setting a file stores away from its default: linear rope scaling of global layers, a local rope base that
# is not llama.cpp's assumed 10,000, a final logit softcap.
EVERY_SETTING = dataclasses.replace(TINY, rope_scale_global=8.0, rope_base_local=5_000.0, final_logit_softcap=30.0)


def trained_like(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    params = {k: np.asarray(v) for k, v in flat_params(init_model(config, seed=seed)).items()}
    rng = np.random.default_rng(seed)
    for name, value in params.items():
        if name.endswith(".scale"):
            params[name] = rng.uniform(0.5, 3.0, value.shape).astype(np.float32)
    params["embedder.embedding"] = rng.standard_normal(params["embedder.embedding"].shape).astype(np.float32)
    return params


def write_model(out: Path, config: ModelConfig, tokenizer: Tokenizer, **prune) -> Path:
    """A model directory of `config`, cut by `prune.structure.prune_params(**prune)` when given (layers=...,
    vocab=...: what `nano prune` does); a `vocab` cut also trims the tokenizer to those pieces."""
    params = trained_like(config)
    if prune:
        from prune.structure import prune_params
        from prune.vocab import trim_tokenizer

        config, params = prune_params(config, params, **prune)
        if "vocab" in prune:
            tokenizer = trim_tokenizer(tokenizer, prune["vocab"])
    return save_model_dir(config, params, tokenizer, out)


def trimmed_vocab_ids(tokenizer: Tokenizer, size: int = 400) -> np.ndarray:
    """The ids `nano prune --vocab-size` keeps: counted on text, with every kept piece's merge path."""
    from prune.vocab import piece_counts, select_pieces

    return select_pieces(tokenizer, piece_counts(tokenizer, training_text(lines=300)), size)


def logits(model_dir: Path, tokens=None) -> np.ndarray:
    """[T, vocab] float32 logits of the 24 fixed tokens (three times the window), ids folded into the vocabulary."""
    model, _ = load_model_dir(model_dir)
    ids = np.asarray(tokens or TOKENS) % model.config.vocab_size
    out, _ = model(jnp.asarray(ids[None]))
    return np.asarray(out[0])


def params(model_dir: Path) -> dict[str, np.ndarray]:
    model, _ = load_model_dir(model_dir)
    return {k: np.asarray(v) for k, v in flat_params(model).items()}


def assert_same_model(src: Path, back: Path) -> float:
    """A round trip's result equals its source: parameters bit for bit, layer kinds, query scale, logits within
    1e-5; returns the largest logit difference."""
    ours, theirs = params(src), params(back)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(theirs[name], ours[name], err_msg=name)
    assert load_config(back).layer_types == load_config(src).layer_types
    assert load_config(back).query_scale == load_config(src).query_scale
    delta = float(np.abs(logits(back) - logits(src)).max())
    assert delta <= 1e-5, delta
    return delta
