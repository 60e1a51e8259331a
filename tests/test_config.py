"""Configs and presets: exact parameter counts without allocating, Nano sizes, validation."""

import dataclasses

import pytest

from nano.config import GEMMA3_270M, GLOBAL, LOCAL, PRESETS, TINY, ModelConfig, preset
from nano.errors import NanoError
from nano.model import abstract_model, count_params


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_formula_matches_the_model(name):
    config = PRESETS[name]
    assert count_params(abstract_model(config)) == config.param_count


@pytest.mark.parametrize("name, target", [("nano-1", 1.80e9), ("nano-2", 3.25e9)])
def test_nano_sizes_within_one_percent(name, target):
    config = preset(name)
    params = count_params(abstract_model(config))
    assert abs(params - target) / target <= 0.01
    assert config.num_kv_heads == 1  # multi-query attention, as in Gemini
    assert config.max_seq_len == 32_768
    assert config.vocab_size == GEMMA3_270M.vocab_size  # the teacher's vocabulary


def test_teacher_preset_is_gemma3_270m():
    # 268.1M parameters, 167.8M of them the embedding (DESIGN.md).
    assert GEMMA3_270M.param_count == 268_098_176
    assert GEMMA3_270M.vocab_size * GEMMA3_270M.d_model == 167_772_160
    assert [i for i, t in enumerate(GEMMA3_270M.layer_types) if t == GLOBAL] == [5, 11, 17]


def test_layer_pattern_and_derived_values():
    assert TINY.layer_types == (LOCAL, GLOBAL, LOCAL, GLOBAL)
    assert dataclasses.replace(TINY, sliding_window=None).layer_types == (GLOBAL,) * 4
    assert TINY.queries_per_kv_head == 2
    assert TINY.query_scale == pytest.approx(16 ** -0.5)
    assert dataclasses.replace(TINY, query_pre_attn_scalar=24.0).query_scale == pytest.approx(24 ** -0.5)


@pytest.mark.parametrize("change, message", [
    (dict(num_heads=3), "multiple of num_kv_heads"),
    (dict(head_dim=15), "even"),
    (dict(d_model=0), "positive"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(final_logit_softcap=-1.0), "softcap"),
    (dict(architecture="llama"), "unknown architecture"),
])
def test_impossible_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **change)


def test_json_round_trip_and_hash():
    restored = ModelConfig.from_dict(TINY.to_dict())
    assert restored == TINY and restored.hash == TINY.hash
    assert dataclasses.replace(TINY, d_model=32).hash != TINY.hash


def test_from_dict_errors_are_clear():
    with pytest.raises(NanoError, match="unknown architecture"):
        ModelConfig.from_dict({**TINY.to_dict(), "architecture": "mamba"})
    with pytest.raises(NanoError, match="unknown fields"):
        ModelConfig.from_dict({**TINY.to_dict(), "n_experts": 8})
    with pytest.raises(NanoError, match="invalid model config"):
        ModelConfig.from_dict({**TINY.to_dict(), "num_heads": 3})
    with pytest.raises(NanoError, match="unknown preset"):
        preset("nano-9")


def test_flops_per_token_counts_weights_and_capped_attention():
    c = TINY
    short = c.flops_per_token(4)
    long = c.flops_per_token(100)
    # Two local layers stop growing at the window (8); two global layers keep growing.
    per_layer = 4 * c.num_heads * c.head_dim
    assert long - short == per_layer * (2 * (8 - 4) + 2 * (100 - 4))
    assert short == 2 * c.param_count + per_layer * 4 * 4
