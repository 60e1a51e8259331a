"""Quantize a model: RTN everywhere, or GPTQ / AWQ for the projections (calibrated block by block). The tied
embedding is the lookup table and the output head at once: rounded to nearest at int8, and at int4 under GPTQ
calibrated as the head (GPTQ on the final hidden states the quantized blocks make), since at 4 bits the head's
rounding is the larger cost (measured on the embedded teacher: bits per byte +2.7% against RTN's +6.0%).

    qmodel, info = quantize_model(model, tokenizer, QuantizeSettings(method="gptq"))

The projections' inputs are Hadamard-rotated first (nano.rotation, `--rotate`): the same float function, whose
kernels int4 and the device's int8 rounding of their inputs lose less on (measured on the make-distill student,
GPTQ int4-b32 through the device model: bits per byte +5.8% over float plain, +4.2% with the down input rotated,
+3.1% with every block input too). The input model is left as it was; the result shares its float norms
(AWQ's folded ones excepted).
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import numpy as np
from flax import nnx

from nano.checkpoint import flat_params, model_from_flat, param_path
from nano.corpus import text_or_split
from nano.errors import NanoError
from nano.perplexity import calibration_windows
from nano.quant_scheme import QuantSpec
from nano.quant import QuantizedWeight, quantize_rtn
from nano.rotation import rotated_params
from quantize import awq
from quantize.calibrate import InputStats, walk_blocks
from quantize.gptq import gptq
from quantize.settings import QuantizeSettings

Progress = Callable[[str, int, int], None]  # (stage, done, total)
EMBEDDING = "embedder.embedding"


def quantize_model(model, tokenizer, settings: QuantizeSettings, *, progress: Progress | None = None):
    """(quantized copy of model, info for quant.json)."""
    settings.check()
    start = time.perf_counter()
    params = flat_params(model)
    if any(isinstance(v, QuantizedWeight) for v in params.values()):
        raise NanoError("the model is already quantized; quantize its float source instead")
    config = model.config
    rotation = {"ffn": settings.rotation(config.ffn_dim), "inputs": settings.rotation(config.d_model)}
    if (rotation["ffn"], rotation["inputs"]) != (config.ffn_rotation, config.input_rotation):  # the same function
        config, rotated = rotated_params(config, {k: np.asarray(v) for k, v in params.items()}, rotation["ffn"],
                                         rotation["inputs"])
        model = model_from_flat(config, rotated, dtype=model.dtype)
        params = flat_params(model)
    qmodel = nnx.clone(model)
    specs = settings.tensor_specs(params)
    for name, spec in specs.items():
        try:
            spec.block(params[name].shape)
        except ValueError as e:
            raise NanoError(f"cannot quantize {name} at --block-size {settings.block_size}: {e}") from None
    state = nnx.state(qmodel, nnx.Param)
    info = {"method": settings.method, "scheme": settings.scheme.name, "settings": settings.to_dict(),
            "rotation": rotation}
    head_by_gptq = settings.method == "gptq" and settings.embeddings == "int4"
    for path, var in nnx.to_flat_state(state):  # RTN: everything; GPTQ/AWQ: the embedding (before calibration)
        name = param_path(path)
        if name in specs and (settings.method == "rtn" or not name.endswith(".kernel")):
            var.set_value(quantize_rtn(var.get_value(), specs[name]))
    nnx.update(qmodel, state)
    float_table = np.asarray(params[EMBEDDING]) if head_by_gptq else None
    if settings.method != "rtn":
        # Twice the characters the samples need (~4 per token), so the windows spread across many files.
        text, source = text_or_split(settings.calibration, "train", max_chars=settings.samples * settings.seq_len * 8)
        tokens = calibration_windows(tokenizer, text, samples=settings.samples, seq_len=settings.seq_len)
        on_block = functools.partial(_gptq_block if settings.method == "gptq" else _awq_block, settings=settings,
                                     specs=specs, config=model.config)
        head = walk_blocks(qmodel, tokens, on_block,
                           progress=progress and (lambda done, total: progress(f"{settings.method} blocks", done,
                                                                                total)))
        if head_by_gptq:
            if progress:
                progress("gptq head", 0, 1)
            qmodel.embedder.embedding.set_value(_gptq_head(float_table, head, specs[EMBEDDING], settings))
            info["head"] = "gptq"
        info["calibration"] = {"text": source, "samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])}
    info["seconds"] = round(time.perf_counter() - start, 1)
    return qmodel, info


def _gptq_head(table: np.ndarray, stats: InputStats, spec: QuantSpec, settings) -> QuantizedWeight:
    """The tied table [vocab, d_model] quantized by GPTQ as the head's kernel [d_model, vocab] (its blocks run
    along d_model either way), stored back in the table's layout."""
    head = gptq(table.T, stats.hessian, QuantSpec(spec.bits, spec.block_size, 0), damp=settings.damp,
                act_order=settings.act_order)
    return QuantizedWeight(codes=np.ascontiguousarray(np.asarray(head.codes).T),
                           scales=np.ascontiguousarray(np.asarray(head.scales).T), spec=spec)


def _module(block, name: str):
    return functools.reduce(getattr, name.split("."), block)


def _kernel_spec(specs: dict[str, QuantSpec], index: int, name: str) -> QuantSpec:
    return specs[f"layers.{index}.{name}.kernel"]


def _gptq_block(index, block, stats: dict[str, InputStats], *, settings, specs, config) -> None:
    for name, stat in stats.items():
        linear = _module(block, name)
        kernel = np.asarray(linear.kernel.get_value())
        linear.kernel.set_value(gptq(kernel, stat.hessian, _kernel_spec(specs, index, name), damp=settings.damp,
                                     act_order=settings.act_order))


def _awq_block(index, block, stats: dict[str, InputStats], *, settings, specs, config) -> None:
    block_specs = {name: _kernel_spec(specs, index, name) for name in stats}
    kernels, hessians = awq_scale_and_fold(block, stats, block_specs, config)
    for name, kernel in kernels.items():
        _module(block, name).kernel.set_value(awq.clip_and_quantize(kernel, hessians[name], block_specs[name]))


def awq_scale_and_fold(block, stats: dict[str, InputStats], specs: dict[str, QuantSpec], config):
    """Search the four input groups' scales on the float weights and fold 1/s into the norms and projections that
    make those inputs (in the block, in place). Returns the scaled kernels still to be rounded, and the Hessians
    of their (now scaled) inputs; the block's float function is unchanged."""
    heads = (config.num_kv_heads, config.queries_per_kv_head, config.head_dim)
    groups = [  # (projections sharing an input, where 1/s is folded, how query heads tie)
        (("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn_norm", None),
        (("attn.o_proj",), "attn.v_proj", heads),
        (("mlp.gate", "mlp.up"), "mlp_norm", None),
        (("mlp.down",), "mlp.up", None),
    ]
    kernels = {name: np.asarray(_module(block, name).kernel.get_value(), np.float64) for name in stats}
    hessians = {}
    # A rotated input: a per-channel scale cannot pass the rotation into what makes it (the norm, or up).
    rotated = {"attn_norm": config.input_rotation, "mlp_norm": config.input_rotation, "mlp.up": config.ffn_rotation}
    for names, fold_into, _ in groups:
        if rotated.get(fold_into):
            hessians.update({n: stats[names[0]].hessian for n in names})
    groups = [g for g in groups if not rotated.get(g[1])]
    for names, fold_into, tie in groups:
        stat = stats[names[0]]
        s = awq.search_scale([kernels[n] for n in names], stat.hessian, stat.mean_abs, [specs[n] for n in names],
                             heads=tie)
        for n in names:
            kernels[n] = kernels[n] * s[:, None]
            hessians[n] = stat.hessian / np.outer(s, s)  # the inputs are now X / s
        target = _module(block, fold_into)
        if fold_into.endswith("_norm"):
            target.scale.set_value(target.scale.get_value() / s.astype(np.float32))
        else:  # a projection's output columns; for v, one column per (KV head, dim) that the tied s shares
            cols = s.reshape(heads)[:, 0, :].reshape(-1) if tie else s
            kernels[fold_into] = kernels[fold_into] / cols[None, :]
    for name, kernel in kernels.items():
        _module(block, name).kernel.set_value(kernel.astype(np.float32))
    return kernels, hessians
