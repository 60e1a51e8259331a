"""`nano quantize` as a library call: load, quantize, measure against the float model, write the directory."""

from __future__ import annotations

from pathlib import Path

from nano.checkpoint import flat_params, load_quant_info, save_model_dir
from nano.corpus import text_or_split
from nano.errors import NanoError
from nano.files import directory_bytes
from nano.resolve import load_model, resolve_model_dir
from nano.ui import progress_bar, status
from quantize.settings import QuantizeSettings

EVAL_CHARS = 40_000  # the held-out text issue 3's teacher figures used: 9,763 tokens


def quantize(model: str, out: str | Path, settings: QuantizeSettings, *, eval_path: str | None = None,
             evaluate: bool = True, force: bool = False) -> dict:
    """Quantize MODEL into the model directory `out`; returns what quant.json records plus sizes."""
    from quantize.pipeline import quantize_model
    from quantize.report import quantization_loss, size_report

    settings.check()
    out = Path(out)
    if out.exists() and not force:
        raise NanoError(f"{out} already exists (pass --force to replace it)")
    text, text_source = text_or_split(eval_path, "heldout", max_chars=EVAL_CHARS) if evaluate else (None, None)
    source = resolve_model_dir(model)
    with status(f"loading {model}"):
        net, tokenizer = load_model(source)
    with progress_bar() as bar:
        task = bar.add_task(f"{settings.method} {settings.scheme.name}", total=None)
        qnet, info = quantize_model(net, tokenizer, settings,
                                    progress=lambda stage, done, total: bar.update(task, description=stage,
                                                                                   completed=done, total=total))
    info["source"] = {"model": str(model), "config_hash": net.config.hash}
    if evaluate:
        with status(f"comparing with the float model on {text_source}"):
            info["report"] = {**quantization_loss(net, qnet, tokenizer, text), "text": text_source}
    save_model_dir(qnet.config, flat_params(qnet), tokenizer, out, overwrite=force, quant_info=info)
    sizes = size_report(qnet.config, load_quant_info(out), out)
    sizes["source_bytes_on_disk"] = directory_bytes(source)
    return {**info, **sizes, "out": str(out)}
