"""How much a quantized model lost: perplexity (the `nano perplexity` protocol) of the float and the quantized
model on the same windows, KL(float ‖ quantized) and top-1 agreement per token, bits per weight and size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.evaluate import Evaluator
from nano.checkpoint import directory_bytes, param_shapes
from nano.perplexity import make_windows
from nano.quant_io import weight_bits


def window_batches(tokenizer, text: str, *, window: int = 512, batch_size: int = 4) -> list[dict]:
    """The perplexity protocol's windows as evaluation batches: each scored token is a target with weight 1."""
    tokens, weights = make_windows(tokenizer.encode(text), window=window, bos_id=tokenizer.bos_id,
                                   pad_id=tokenizer.pad_id)
    fill = -len(tokens) % batch_size  # whole batches: one compiled shape
    tokens = np.concatenate([tokens, np.full((fill, window), tokenizer.pad_id, np.int32)])
    weights = np.concatenate([weights, np.zeros((fill, window), np.float32)])
    targets = np.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    positions = np.broadcast_to(np.arange(window, dtype=np.int32), tokens.shape)
    return [{"tokens": tokens[i:i + batch_size], "targets": targets[i:i + batch_size],
             "positions": positions[i:i + batch_size], "segment_ids": np.ones((batch_size, window), np.int32),
             "weights": weights[i:i + batch_size]} for i in range(0, len(tokens), batch_size)]


def compare(float_model, quant_model, tokenizer, text: str, *, window: int = 512, batch_size: int = 4) -> dict:
    batches = window_batches(tokenizer, text, window=window, batch_size=batch_size)
    base = Evaluator(batches)(float_model)
    quant = Evaluator(batches, teacher_model=float_model)(quant_model)
    return {"float_ppl": base["heldout_ppl"], "quant_ppl": quant["heldout_ppl"],
            "ppl_increase": quant["heldout_ppl"] - base["heldout_ppl"],
            "ppl_increase_pct": 100 * (quant["heldout_ppl"] / base["heldout_ppl"] - 1),
            "kl": quant["kl_teacher_student"], "top1_agreement": quant["teacher_student_top1"],
            "tokens": quant["heldout_tokens"], "window": window}


def size_report(config, quant_info: dict | None, directory: Path | None = None) -> dict:
    report = weight_bits(quant_info, param_shapes(config))
    if directory is not None:
        report["bytes_on_disk"] = directory_bytes(directory)
    return report
