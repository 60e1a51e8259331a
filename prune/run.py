"""`nano prune` as a library call: a student's start, cut from its teacher by measured importance.

    result = prune("gemma3-270m", "runs/student", PruneSettings(vocab_size=32768, layers=16))

The order follows what each axis needs. The vocabulary comes first (the pieces the calibration text uses, with
their merge paths: prune.vocab), and the other scores are measured on the vocabulary-trimmed model, tokenized as
the student will be: the model that is cut further is the one measured, and its 8× smaller output head makes the
depth scores (one full-model loss per skipped layer) affordable. Depth keeps the layers whose removal costs most
(`drop_nll`; Block Influence is reported beside it, with their rank correlation); width keeps the highest-scoring
FFN neurons per layer, query heads per KV group and embedding channels (prune.importance).

The result is a float model directory every command takes, with `prune.json` (what was kept, every score,
parameter counts) and `prune.png` (the scores, with the cut).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from nano.checkpoint import float_params, load_quant_info, model_from_flat, save_model_dir
from nano.documents import training_texts
from nano.errors import NanoError
from nano.files import peak_rss_bytes
from nano.perplexity import calibration_windows
from nano.resolve import load_model, resolve_model_dir
from nano.rotation import rotated_params
from nano.ui import status
from prune.settings import PruneSettings

PRUNE_FILE, PLOT_FILE = "prune.json", "prune.png"
FORMAT, VERSION = "nano-prune", 1


def _rank_correlation(a, b) -> float:
    """Spearman's ρ (ties broken by index: the scores here are continuous)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def _vocabulary(tokenizer, config, params, texts, settings, record):
    """The vocabulary-trimmed tokenizer, config and params (unchanged without --vocab-size)."""
    from prune.structure import prune_params
    from prune.vocab import piece_counts, select_pieces, teacher_to_student, trim_tokenizer

    if settings.vocab_size is None:
        return tokenizer, config, params
    with status(f"choosing {settings.vocab_size:,} pieces from the calibration text"):
        counts = piece_counts(tokenizer, texts)
        keep = select_pieces(tokenizer, counts, settings.vocab_size)
        student = trim_tokenizer(tokenizer, keep)
    kept_count = counts[keep].sum()
    record["kept"]["vocab"] = keep.tolist()
    record["scores"]["vocab_counts"] = counts[keep].tolist()
    record["calibration"]["teacher_tokens"] = int(counts.sum())
    record["calibration"]["coverage"] = float(kept_count / max(counts.sum(), 1))
    record["calibration"]["distinct_pieces"] = int(np.count_nonzero(counts))
    assert np.array_equal(teacher_to_student(keep, tokenizer.vocab_size)[keep], np.arange(len(keep)))
    config, params = prune_params(config, params, vocab=keep)
    return student, config, params


def _width(model, windows, settings, record, batch_size):
    from prune.importance import width_importance
    from prune.structure import choose, choose_heads

    config = model.config
    if not {"ffn_dim", "num_heads", "d_model"} & set(settings.axes):
        return {}
    with status(f"width importance on {windows.size:,} tokens"):
        scores = width_importance(model, windows, batch_size=batch_size)
    record["scores"].update(ffn=scores["ffn"].tolist(), heads=scores["heads"].tolist(),
                            channels=scores["channels"].tolist())
    kept = {}
    if settings.ffn_dim is not None:
        kept["ffn"] = [choose(layer, settings.ffn_dim) for layer in scores["ffn"]]
    if settings.num_heads is not None:
        kept["heads"] = [choose_heads(layer, settings.num_heads, config.num_kv_heads) for layer in scores["heads"]]
    if settings.d_model is not None:
        kept["channels"] = choose(scores["channels"], settings.d_model)
    return kept


def _depth(model, windows, settings, record, batch_size):
    from prune.importance import layer_importance
    from prune.structure import choose

    if settings.keep_layers is not None:
        return list(settings.keep_layers)
    if settings.layers is None:
        return None
    with status(f"depth importance: the loss without each of {model.config.num_layers} layers"):
        scores = layer_importance(model, windows, batch_size=batch_size)
    record["scores"].update(block_influence=scores["block_influence"].tolist(), drop_nll=scores["drop_nll"].tolist(),
                            nll=float(scores["nll"]))
    record["depth_rank_correlation"] = _rank_correlation(scores["block_influence"], scores["drop_nll"])
    return choose(scores["drop_nll"], settings.layers)


def prune(teacher: str, out: str | Path, settings: PruneSettings, *, force: bool = False) -> dict:
    """Prune TEACHER into the model directory `out`; returns prune.json's record."""
    from prune.report import plot_scores
    from prune.structure import prune_params

    started = time.perf_counter()
    settings.check()
    out = Path(out)
    if out.exists() and not force:
        raise NanoError(f"{out} already exists (pass --force to replace it)")
    if load_quant_info(resolve_model_dir(teacher)) is not None:
        raise NanoError(f"{teacher} is quantized: prune its float source, then quantize the student")
    with status(f"loading {teacher}"):
        model, tokenizer = load_model(teacher)
    if model.config.ffn_rotation or model.config.input_rotation:  # importance is per neuron: the plain model
        model = model_from_flat(*rotated_params(model.config, float_params(model), None, None))
    settings.check(model.config)
    texts = training_texts(settings.calibration, what="--calibration")
    record = {"format": FORMAT, "version": VERSION, "settings": settings.to_dict(),
              "teacher": {"model": str(teacher), "config_hash": model.config.hash,
                          "params": model.config.param_count},
              "calibration": {"documents": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts)},
              "kept": {}, "scores": {}}
    config, params = model.config, float_params(model)
    del model
    student_tok, config, params = _vocabulary(tokenizer, config, params, texts, settings, record)
    kept = {}
    if set(settings.axes) - {"vocab_size"}:
        measured = model_from_flat(config, params)
        windows = calibration_windows(student_tok, "\n\n".join(texts), samples=settings.samples,
                                      seq_len=settings.seq_len)
        record["calibration"]["windows"] = list(windows.shape)
        kept = _width(measured, windows, settings, record, settings.batch_size)
        kept["layers"] = _depth(measured, windows, settings, record, settings.batch_size)
        del measured
    config, params = prune_params(config, params, **kept)
    record["kept"].update({k: v for k, v in kept.items() if v is not None})
    record["student"] = {"config_hash": config.hash, "params": config.param_count,
                         "fraction_of_teacher": config.param_count / record["teacher"]["params"]}
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["peak_rss_bytes"] = peak_rss_bytes()  # the process's peak so far: the teacher, its scores, the student
    with status(f"writing {out}"):
        save_model_dir(config, params, student_tok, out, overwrite=force,
                       extra={PRUNE_FILE: json.dumps(record) + "\n", PLOT_FILE: plot_scores(record)})
    return record
