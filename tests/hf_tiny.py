"""A tiny Gemma 3 checkpoint in Hugging Face format, written with numpy alone.

`write_tiny_hf_checkpoint(dir)` lays out what `Gemma3ForCausalLM.save_pretrained` would: `config.json`, the
weights under Hugging Face names and conventions (nn.Linear kernels [out, in], RMSNorm weights `w` applied as
`1 + w`, tied embedding so no `lm_head.weight`) in two safetensors shards with `model.safetensors.index.json`,
and a SentencePiece `tokenizer.model` trained here. The tensors come from a seeded numpy generator, so they are
the same on every machine.

The tensor names are spelled out here rather than taken from `nano.names`, so that the importer's table is checked
against an independent list. This module needs only numpy, sentencepiece and safetensors: the golden script
(`tests/golden/make_hf_golden.py`) imports it from a venv that has transformers and torch but not JAX.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

SEED = 0
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 512, 64, 4, 4, 2, 16, 128
WINDOW = 8

# What `Gemma3TextConfig(...).to_dict()` holds for this model, in the older spelling of the published Gemma 3
# checkpoints (rope_theta / rope_local_base_freq, layer_types); transformers converts it on load.
CONFIG = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},  # as Gemma 3 4B and larger
    "sliding_window": WINDOW,
    "layer_types": ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(LAYERS)],
    "query_pre_attn_scalar": 24,  # not head_dim, so a scalar left out would show
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "torch_dtype": "float32",
}

# 24 fixed token ids (BOS first): longer than the window of 8, so local and global layers differ.
TOKENS = [2, 287, 41, 498, 113, 7, 350, 262, 19, 444, 128, 77, 301, 5, 199, 510, 64, 233, 381, 12, 455, 96, 170, 3]


def tiny_hf_tensors(seed: int = SEED) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint under its Hugging Face name, float32, in a fixed order."""
    rng = np.random.default_rng(seed)
    tensors = {}

    def kernel(name, out_dim, in_dim):  # nn.Linear weight [out, in], variance 1/in
        tensors[name] = (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm(name, dim):  # stored w of (1 + w): perturbed well away from 0 so a missing +1 shows
        tensors[name] = (0.5 * rng.standard_normal(dim)).astype(np.float32)

    # Unit-scale embedding: the tied head then gives logits of tens, where the softcap of 30 bends them.
    tensors["model.embed_tokens.weight"] = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        norm(p + "input_layernorm.weight", HIDDEN)
        kernel(p + "self_attn.q_proj.weight", HEADS * HEAD_DIM, HIDDEN)
        kernel(p + "self_attn.k_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        kernel(p + "self_attn.v_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        kernel(p + "self_attn.o_proj.weight", HIDDEN, HEADS * HEAD_DIM)
        norm(p + "self_attn.q_norm.weight", HEAD_DIM)
        norm(p + "self_attn.k_norm.weight", HEAD_DIM)
        norm(p + "post_attention_layernorm.weight", HIDDEN)
        norm(p + "pre_feedforward_layernorm.weight", HIDDEN)
        kernel(p + "mlp.gate_proj.weight", FFN, HIDDEN)
        kernel(p + "mlp.up_proj.weight", FFN, HIDDEN)
        kernel(p + "mlp.down_proj.weight", HIDDEN, FFN)
        norm(p + "post_feedforward_layernorm.weight", HIDDEN)
    tensors["model.norm.weight"] = (0.5 * rng.standard_normal(HIDDEN)).astype(np.float32)
    return tensors


def training_text(seed: int = SEED, lines: int = 2000) -> list[str]:
    """Deterministic pseudo-words from a small syllable set: enough distinct merges for a 512-piece BPE."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "the", "and", "ing", "er", "on", "st", "qu", "ph",
                 "ch", "ou", "ea", "ly", "ed", "or", "an", "is"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(400)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    out = []
    for _ in range(lines):
        n = int(rng.integers(4, 14))
        line = " ".join(rng.choice(words, size=n, p=zipf))
        out.append(line.capitalize() + rng.choice([".", ",", "!", "?", ";"]) + f" {int(rng.integers(0, 1000))}")
    return out


def train_tokenizer(vocab_size: int = VOCAB) -> bytes:
    """A SentencePiece BPE model with byte fallback and Gemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, num_threads=1, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        split_digits=True, minloglevel=2,
    )
    return model.getvalue()


def write_tiny_hf_checkpoint(directory, *, dtype: str = "float32", seed: int = SEED,
                             tokenizer: bytes | None = None) -> Path:
    """Write the checkpoint into `directory` (created); returns it. `dtype` is "float32" or "bfloat16".

    The weights go into two shards (embedding and layers 0-1; layers 2-3 and the final norm) listed in
    `model.safetensors.index.json`, the layout `save_pretrained` uses for a large model.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = tiny_hf_tensors(seed)
    if dtype == "bfloat16":
        import ml_dtypes

        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    elif dtype != "float32":
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")

    names = list(tensors)
    split = names.index(f"model.layers.{LAYERS // 2}.input_layernorm.weight")
    shards = {"model-00001-of-00002.safetensors": names[:split], "model-00002-of-00002.safetensors": names[split:]}
    weight_map = {}
    for file, shard_names in shards.items():
        save_file({k: tensors[k] for k in shard_names}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard_names})
    total = sum(v.nbytes for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps({**CONFIG, "torch_dtype": dtype}, indent=2) + "\n")
    (directory / "tokenizer.model").write_bytes(tokenizer if tokenizer is not None else train_tokenizer())
    return directory
