"""`nano distill`, `nano distill cache-teacher` and `nano plan`: the command-line face of distill.run and
distill.plan."""

from __future__ import annotations

import functools
import json

import click

from cli.common import CONTEXT, Group
from distill.settings import DTYPES, LOSS_KINDS, REMAT, SAMPLE_MODES, SPARSE_TARGETS, DistillSettings
from nano.errors import NanoError
from nano.quant_scheme import EMBEDDINGS

DEFAULTS = DistillSettings()


def _data_options(f):
    """Options that fix the teacher and the order of the training batches: a teacher cache is only valid for a
    run given the same ones."""
    options = [
        click.option("--teacher", default=DEFAULTS.teacher, show_default=True, help="Teacher MODEL (directory or preset)."),
        click.option("--student", default=DEFAULTS.student, show_default=True,
                     help="A preset (random init with the teacher's vocabulary, e.g. nano-micro) or a model directory "
                          "to start from (e.g. `nano prune`'s); its tokenizer tokenizes the data."),
        click.option("--data", multiple=True, default=DEFAULTS.data, show_default=True,
                     help="Training text: files, directories, .jsonl (text field), .parquet, or 'stdlib' "
                          "(the default corpus). Repeat for several."),
        click.option("--eval-data", multiple=True,
                     help="Held-out documents (default: a 2% split of --data by path)."),
        click.option("--steps", default=DEFAULTS.steps, show_default=True, help="Optimizer steps."),
        click.option("--batch-size", default=DEFAULTS.batch_size, show_default=True, help="Sequences per micro-batch."),
        click.option("--seq-len", default=DEFAULTS.seq_len, show_default=True, help="Tokens per sequence."),
        click.option("--grad-accum", default=DEFAULTS.grad_accum, show_default=True,
                     help="Micro-batches per optimizer step."),
        click.option("--top-k", default=DEFAULTS.top_k, show_default=True,
                     help="Teacher tokens kept per position (see --sparse-target)."),
        click.option("--sample-mode", type=click.Choice(SAMPLE_MODES), default=DEFAULTS.sample_mode,
                     show_default=True, help="The k tokens: drawn by teacher probability, or the k largest."),
        click.option("--random-teacher", is_flag=True,
                     help="--teacher is a preset (e.g. gemma3-4b, gemma3-12b) initialised with random weights, "
                          "sharded on the mesh: throughput runs of a teacher whose checkpoint you do not have."),
        click.option("--teacher-dtype", type=click.Choice(DTYPES), default=DEFAULTS.teacher_dtype,
                     show_default=True),
        click.option("--seed", default=DEFAULTS.seed, show_default=True, help="Data order, initialisation, sampling."),
    ]
    return functools.reduce(lambda g, opt: opt(g), reversed(options), f)


def _settings(**kwargs) -> DistillSettings:
    for key in ("data", "eval_data", "eval_text"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return DistillSettings(**kwargs)


def _distributed(coordinator, num_processes, process_id):
    import jax

    from nano.ui import console

    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    console.quiet = jax.process_index() > 0  # one progress display: process 0's


def _peer_stopped(error: Exception) -> bool:
    """A cross-process collective failed because the other end went away: gloo's words, whichever call (a train
    step, a checkpoint's barrier, a gather) and exception type (JaxRuntimeError, ValueError) carried them."""
    text = str(error)
    return "Gloo" in text or "by peer" in text


def _leave_distributed_run(error: Exception, out: str) -> None:
    """A process of a distributed run that fails leaves at once, in one line. Exiting normally would wait in
    jax.distributed's shutdown barrier for processes that will never reach it, until its heartbeat timeout aborts
    the process with a stack dump; and the other processes learn of it the moment this one's connections close
    (their next collective fails here too)."""
    import os
    import sys
    import traceback

    import jax

    from distill.checkpoints import committed_steps

    if _peer_stopped(error):  # a collective failed: a peer died, or its host did
        steps = committed_steps(out)
        where = f"its last checkpoint is step {steps[-1]}" if steps else "it had saved no checkpoint yet"
        why = str(error).splitlines()[0][:200]
        message = (f"another process of this distributed run stopped ({why}); {where} in {out}/checkpoints: start "
                   "every process again with --resume")
    elif isinstance(error, NanoError):
        message = str(error)
    else:  # a bug: its traceback, then leave like the rest
        traceback.print_exception(error)
        message = f"{type(error).__name__}: {error}"
    print(f"Error: process {jax.process_index()}: {message}", file=sys.stderr, flush=True)
    os._exit(1)


@click.group("distill", cls=Group, invoke_without_command=True, context_settings=CONTEXT)
@_data_options
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (required).")
@click.option("--loss", type=click.Choice(LOSS_KINDS), default=DEFAULTS.loss, show_default=True,
              help="Forward KL, reverse KL, generalised JSD(beta), or cross-entropy alone (no teacher).")
@click.option("--alpha", default=DEFAULTS.alpha, show_default=True, help="Weight of next-token CE mixed into the loss.")
@click.option("--temperature", default=DEFAULTS.temperature, show_default=True)
@click.option("--beta", default=DEFAULTS.beta, show_default=True, help="JSD's beta.")
@click.option("--sparse-target", type=click.Choice(SPARSE_TARGETS), default=None,
              help="The teacher's k tokens renormalised over themselves (Gemma 3), or kept at their full-vocabulary "
                   "probabilities with the rest of the mass as one more outcome, so that the loss is least at the "
                   "teacher itself (--temperature 1; for QAT, flat teachers and trimmed vocabularies). Default: rest "
                   "for a student with a trimmed vocabulary, else renormalise.")
@click.option("--teacher-cache", type=click.Path(file_okay=False),
              help="Read the teacher from a cache written by `nano distill cache-teacher` (same data options).")
@click.option("--on-policy-fraction", default=DEFAULTS.on_policy_fraction, show_default=True,
              help="Fraction of steps that train on the student's own samples, scored by the teacher.")
@click.option("--lr", default=DEFAULTS.lr, show_default=True, help="Peak learning rate (warmup + cosine).")
@click.option("--warmup-steps", type=int, help="Default: 5% of --steps.")
@click.option("--mesh", help="Device mesh, e.g. data=2,fsdp=4 (default: data parallel over all devices).")
@click.option("--compute-dtype", type=click.Choice(DTYPES), default=DEFAULTS.compute_dtype,
              show_default=True, help="bfloat16 computes over float32 master weights.")
@click.option("--remat", type=click.Choice(REMAT), default=DEFAULTS.remat, show_default=True,
              help="Rematerialisation: recompute in the backward pass instead of keeping activations. 'dots' keeps "
                   "matmul outputs; 'block' keeps only each block's input (the Nano sizes need it; see `nano plan`).")
@click.option("--qat", default=None, metavar="SCHEME",
              help="Quantization-aware training: the forward pass rounds weights to SCHEME (int4-b32, int4-b128, "
                   "int4-channel; the embedding as --qat-embeddings) with straight-through gradients; also writes "
                   "RUN/final-SCHEME. Gemma 3's recipe: --student and --teacher both the float model, a small "
                   "--lr (3e-5 to 1e-4) and --sparse-target rest.")
@click.option("--qat-embeddings", type=click.Choice(EMBEDDINGS), default=DEFAULTS.qat_embeddings,
              show_default=True, help="The tied embedding / output head under --qat: int8 per row, int4 in the "
                                      "scheme's blocks (what `nano-export --quant int4-b32` writes), or float.")
@click.option("--eval-every", default=DEFAULTS.eval_every, show_default=True, help="Steps between evals (0: at the end).")
@click.option("--eval-batches", default=DEFAULTS.eval_batches, show_default=True, help="Held-out batches per eval.")
@click.option("--eval-text", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Text outside the corpus; the report gives the student's perplexity on it. Repeatable.")
@click.option("--checkpoint-every", default=DEFAULTS.checkpoint_every, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--distributed", is_flag=True,
              help="Several processes (hosts): jax.distributed.initialize(), coordinator from the cluster or the "
                   "options below. Every process runs the same command; --out must be one directory all see.")
@click.option("--coordinator", help="host:port of process 0 (with --distributed).")
@click.option("--num-processes", type=int)
@click.option("--process-id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout at the end.")
@click.pass_context
def distill_cmd(ctx, out, resume, distributed, coordinator, num_processes, process_id, as_json, **kwargs):
    """Distil --teacher into --student: KD with a sparse (top-k or sampled-k) teacher, sharded, resumable.

    \b
    nano distill --student nano-micro --data stdlib --out runs/kd --steps 200
    nano prune gemma3-270m --vocab-size 32768 --out runs/student    # a student cut from the teacher, then healed:
    nano distill --student runs/student --data stdlib --out runs/healed --steps 200
    nano distill cache-teacher --data stdlib --steps 200 --out runs/teacher-cache
    nano distill --teacher-cache runs/teacher-cache --data stdlib --steps 200 --out runs/kd
    nano distill --loss ce --data stdlib --steps 200 --out runs/ce      # the no-teacher baseline
    nano distill --qat int4-b32 --student runs/kd/final --teacher runs/kd/final --lr 1e-4 --sparse-target rest \\
        --out runs/qat

    Writes RUN/metrics.jsonl, eval.jsonl, checkpoints/, final/ (the student as a model directory),
    loss_curve.png and report.json.
    """
    if ctx.invoked_subcommand is not None:
        return
    if not out:
        raise click.UsageError("--out RUN is required")
    if distributed:
        _distributed(coordinator, num_processes, process_id)
    from distill.run import distill

    settings = _settings(**kwargs)
    try:
        report = distill(settings, out, resume=resume)
    except Exception as e:
        if not distributed:
            raise
        _leave_distributed_run(e, out)
    if not report:  # not process 0, which reports for all
        return
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        ev = report["final_eval"]
        where = f"{out}/final" + (f" and {out}/final-{settings.qat}" if settings.qat else "")
        click.echo(f"{out}: {report['tokens_seen']:,} tokens, held-out ppl {ev['heldout_ppl']:.2f}, "
                   f"{report['tokens_per_s']:,.0f} tok/s, MFU {report['mfu']:.1%}; student in {where}")


@distill_cmd.command("cache-teacher")
@_data_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory.")
def cache_teacher_cmd(out, **kwargs):
    """Write the teacher's sparse distribution for the first --steps steps once; any number of student runs with
    the same data options then read it (--teacher-cache). Resumable: re-run to continue or extend."""
    from distill.run import run_cache_teacher

    info = run_cache_teacher(_settings(**kwargs), out)
    click.echo(f"{info.directory}: {info.steps} steps, {info.tokens:,} tokens, {info.bytes / 2**20:,.0f} MiB "
               f"({info.computed} computed in {info.seconds:.0f} s)")


@click.command("plan", context_settings=CONTEXT)
@click.argument("student")
@click.option("--devices", default=1, show_default=True, help="Devices the run shards over.")
@click.option("--memory", "memory_gib", type=float, default=80.0, show_default=True,
              help="Memory per device, GiB (an H100 has 80; a CPU host, its RAM).")
@click.option("--teacher", help="Teacher preset or model directory (default: none, e.g. --loss ce or a cache).")
@click.option("--batch-size", default=DEFAULTS.batch_size, show_default=True, help="Sequences per micro-batch (global).")
@click.option("--seq-len", default=DEFAULTS.seq_len, show_default=True)
@click.option("--grad-accum", default=DEFAULTS.grad_accum, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--mesh", help="As `nano distill --mesh` (default: data parallel over --devices).")
@click.option("--compute-dtype", type=click.Choice(DTYPES), default=DEFAULTS.compute_dtype,
              show_default=True)
@click.option("--teacher-dtype", type=click.Choice(DTYPES), default=DEFAULTS.teacher_dtype,
              show_default=True)
@click.option("--remat", type=click.Choice(REMAT), default=DEFAULTS.remat, show_default=True)
@click.option("--top-k", default=DEFAULTS.top_k, show_default=True)
@click.option("--on-policy", is_flag=True, help="Count the KV cache of the student sampling its own sequences.")
@click.option("--measure", is_flag=True,
              help="Also compile the real train step and teacher scoring for --devices devices (this machine's "
                   "accelerators, or that many fake CPU devices) and print XLA's memory beside the estimate.")
@click.option("--json", "as_json", is_flag=True)
def plan_cmd(student, devices, memory_gib, teacher, as_json, measure, **kwargs):
    """Per-device memory of a `nano distill` run of STUDENT (preset or model directory), before running it:
    parameters, gradients and optimizer (float32, sharded by the partition rules), activations (what autodiff
    keeps under --remat), the teacher (weights and forward pass) and the on-policy KV cache; and whether it fits.

    \b
    nano plan nano-1 --devices 8 --memory 80 --teacher gemma3-12b --mesh fsdp=8 --remat block
    nano plan nano-micro --devices 2 --teacher gemma3-270m --measure     # checks the estimate with XLA
    """
    import os

    if measure and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Before JAX starts: on a machine without accelerators, --devices fake CPU devices to compile for.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}").strip()
    from distill.plan import GiB, PlanSettings, estimate
    from distill.plan import measure as measure_memory
    from nano.resolve import resolve_config

    settings = PlanSettings(devices=devices, memory_gib=memory_gib, **kwargs)
    student_config = resolve_config(student)
    teacher_config = resolve_config(teacher) if teacher else None
    result = {"student": student, "teacher": teacher, "settings": dict(settings.__dict__),
              "estimate": estimate(student_config, teacher_config, settings)}
    if measure:
        result["measured"] = measure_memory(student_config, teacher_config, settings)
        result["estimate_over_measured"] = result["estimate"]["total"] / result["measured"]["total"]
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print_plan(result, GiB)


def _print_plan(result: dict, gib: int) -> None:
    from rich.console import Console
    from rich.table import Table

    est, s = result["estimate"], result["settings"]
    mesh = ", ".join(f"{a}={n}" for a, n in est["mesh"].items() if n > 1) or "one device"
    table = Table(title=f"nano plan {result['student']}: {s['devices']} device(s) ({mesh}), "
                        f"{est['local_batch']} × {s['seq_len']} tokens per device, remat {s['remat']}")
    table.add_column("per device")
    table.add_column("GiB", justify="right")
    table.add_column("")
    notes = {"parameters": "float32 masters",
             "gradients": "float32, within the step" + (" (sum + micro-batch)" if s["grad_accum"] > 1 else ""),
             "optimizer": "AdamW moments", "activations": f"{s['compute_dtype']}, kept for backward + working set",
             "teacher": (f"{result['teacher']}: {est['teacher_params'] / gib:.2f} weights ({s['teacher_dtype']}) "
                         f"+ forward" if result["teacher"] else "none"),
             "kv_cache": "on-policy sampling" if s["on_policy"] else "(with --on-policy)"}
    for part, value in est["parts"].items():
        table.add_row(part.replace("_", " "), f"{value / gib:.2f}", notes[part])
    table.add_row("peak", f"{est['total'] / gib:.2f}", "resident + the largest of backward / update / teacher / "
                  "sampling", style="bold")
    if "measured" in result:
        table.add_row("XLA, compiled", f"{result['measured']['total'] / gib:.2f}",
                      f"estimate / measured {result['estimate_over_measured']:.2f}")
    console = Console()
    console.print(table)
    verdict = "[green]fits[/]" if est["fits"] else "[red]does not fit[/]"
    console.print(f"{verdict} in {s['memory_gib']:g} GiB per device "
                  f"({est['total'] / est['memory']:.0%} of it)")


COMMANDS = (distill_cmd, plan_cmd)
