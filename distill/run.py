"""`nano distill`: one distillation run from its settings, start to finish.

    RUN/run.json        the settings (a resumed run must be given the same ones)
    RUN/metrics.jsonl   one line per optimizer step: loss, ce, kd, grad_norm, lr, tokens/s, MFU
    RUN/eval.jsonl      periodic held-out perplexity, teacher–student top-1 agreement and KL
    RUN/checkpoints/    Orbax checkpoints (exact resume)
    RUN/final/          the student as a model directory (every `nano` command takes it)
    RUN/final-SCHEME/   with --qat: the student quantized to the scheme it trained for (RTN onto the same grid)
    RUN/loss_curve.png, RUN/report.json
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from distill.data import make_datasets
from distill.evaluate import Evaluator
from distill.init import params_state, student_start
from distill.loop import EVAL_FILE, METRICS_FILE, LoopConfig, train
from distill.mfu import forward_flops_per_token, measure_peak_flops, train_flops_per_token
from distill.report import plot_run, read_jsonl
from distill.settings import DistillSettings, qat_block_size
from distill.sharding import make_mesh, model_shardings
from distill.teacher import OnlineTeacher, make_loss, random_teacher
from distill.teacher_cache import CachedTeacher, cache_teacher, held_steps
from distill.train import OptimConfig, fake_quantizer, model_graphdef
from nano.checkpoint import TOKENIZER_FILE, param_shapes, save_model
from nano.config import GEMMA3_270M
from nano.errors import NanoError
from nano.models import embedded_teacher_dir, load_model, resolve_config
from nano.perplexity import perplexity
from nano.quant import tensor_specs
from nano.tokenizer import Tokenizer
from nano.ui import console, status

RUN_FILE, REPORT_FILE, FINAL_DIR = "run.json", "report.json", "final"


# Settings a resumed run may change: they do not alter the trajectory.
_RESUMABLE_CHANGES = {"eval_text", "eval_every", "eval_batches", "checkpoint_every", "teacher_cache", "mesh",
                      "remat"}  # remat recomputes the same values: a run may resume with another policy


def _check_run_dir(run_dir: Path, settings: DistillSettings, resume: bool) -> None:
    """Refuse a resume with other settings, or a new run over an old one (nothing is written here)."""
    saved = run_dir / RUN_FILE
    if resume:
        if not saved.exists():
            raise NanoError(f"--resume: {run_dir} holds no run (no {RUN_FILE})")
        before = dataclasses.asdict(DistillSettings.from_json(saved.read_text()))
        changed = [k for k, v in dataclasses.asdict(settings).items()
                   if before.get(k) != v and k not in _RESUMABLE_CHANGES]
        if changed:
            raise NanoError(f"--resume with other settings than the run was started with: {', '.join(changed)}")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise NanoError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")


def _data(settings: DistillSettings, tokenizer):
    with status("reading and tokenizing the corpus"):
        datasets = make_datasets(settings.data, tokenizer, seq_len=settings.seq_len, batch_size=settings.batch_size,
                                 seed=settings.seed, eval_paths=settings.eval_data or None)
    console.print(f"data: {datasets.stats.summary()}")
    return datasets


def _teacher_meta(settings: DistillSettings, teacher_config) -> dict:
    return {"teacher": teacher_config.hash, "k": settings.top_k, "mode": settings.sample_mode,
            "seed": settings.seed, "dtype": settings.teacher_dtype}


def run_cache_teacher(settings: DistillSettings, out: str | Path):
    """`nano distill cache-teacher`: the teacher's sparse distribution for the first `steps` steps of a run with
    these data settings, written to `out` (resumable)."""
    settings.check()
    teacher, tokenizer = _load_teacher(settings)
    datasets = _data(settings, tokenizer)
    online = OnlineTeacher(teacher, k=settings.top_k, mode=settings.sample_mode, seed=settings.seed,
                           mesh=make_mesh(settings.mesh), vocab_chunk=settings.vocab_chunk)
    return cache_teacher(out, datasets, online, steps=settings.steps, grad_accum=settings.grad_accum,
                         meta=_teacher_meta(settings, teacher.config))


def _load_teacher(settings: DistillSettings):
    """(teacher, tokenizer), laid out on the run's mesh by the partition rules (one copy, which the scoring and
    the evaluation share): a model directory loaded in the teacher dtype, or with --random-teacher a preset
    initialised with random weights, sharded from the start."""
    dtype = getattr(jnp, settings.teacher_dtype)
    if not settings.random_teacher:
        teacher, tokenizer = load_model(settings.teacher, dtype=dtype)
        graphdef, state = nnx.split(teacher)
        state = jax.device_put(state, model_shardings(state, make_mesh(settings.mesh)))
        return nnx.merge(graphdef, state), tokenizer
    config = resolve_config(settings.teacher)
    if config.vocab_size != GEMMA3_270M.vocab_size:
        raise NanoError(f"--random-teacher needs a preset with the embedded tokenizer's {GEMMA3_270M.vocab_size:,} "
                        f"pieces; {settings.teacher} has {config.vocab_size:,}")
    tokenizer = Tokenizer.load(embedded_teacher_dir() / TOKENIZER_FILE)
    return random_teacher(config, dtype=dtype, mesh=make_mesh(settings.mesh), seed=settings.seed), tokenizer


def _prepare_fn(settings, teacher, datasets, config):
    """The loop's prepare(batch, step, params): on-policy samples, then the teacher's sparse distribution."""
    if settings.loss == "ce":
        return None
    online = OnlineTeacher(teacher, k=settings.top_k, mode=settings.sample_mode, seed=settings.seed,
                           mesh=make_mesh(settings.mesh), vocab_chunk=settings.vocab_chunk)
    scorer = online
    if settings.teacher_cache:
        scorer = CachedTeacher(settings.teacher_cache, datasets=datasets, grad_accum=settings.grad_accum,
                               k=settings.top_k)
        _check_cache_meta(settings, teacher.config, scorer.manifest)
        missing = sorted(set(range(settings.steps)) - set(held_steps(settings.teacher_cache)))
        if missing:  # found now rather than after hours of training
            raise NanoError(f"the teacher cache {settings.teacher_cache} lacks {len(missing)} of this run's "
                            f"{settings.steps} steps (from step {missing[0]}); extend it with `nano distill "
                            f"cache-teacher --steps {settings.steps}` and the same data options")
    on_policy = None
    if settings.on_policy_fraction > 0:
        from distill.onpolicy import OnPolicy

        on_policy = OnPolicy(model_graphdef(config), config,
                             fraction=settings.on_policy_fraction, seed=settings.seed)

    def prepare(batch, step, params):
        if on_policy is not None and on_policy.is_on_policy(step):
            return online(on_policy(batch, step, params), step)  # new tokens: only a live teacher can score them
        return scorer(batch, step)

    return prepare


def _check_cache_meta(settings, teacher_config, manifest: dict) -> None:
    expected = _teacher_meta(settings, teacher_config)
    differ = [k for k, v in expected.items() if manifest.get("meta", {}).get(k) != v]
    if differ:
        raise NanoError(f"the teacher cache {settings.teacher_cache} was made with other teacher settings "
                        f"({', '.join(differ)} differ); re-run `nano distill cache-teacher` with this run's settings")


def distill(settings: DistillSettings, run_dir: str | Path, *, resume: bool = False) -> dict:
    """Run (or resume) one distillation; returns the report (also written to RUN/report.json)."""
    settings.check()
    run_dir = Path(run_dir)
    if settings.teacher_cache and not (Path(settings.teacher_cache) / "manifest.json").exists():
        raise NanoError(f"--teacher-cache {settings.teacher_cache} is not a teacher cache (no manifest.json); "
                        f"make one with `nano distill cache-teacher`")
    started = time.perf_counter()
    with status(f"{'initialising' if settings.random_teacher else 'loading'} the teacher {settings.teacher}"):
        teacher, tokenizer = _load_teacher(settings)
    config, init = student_start(settings.student, teacher.config, teacher=teacher,
                                 keep_layers=list(settings.keep_layers) if settings.keep_layers else None)
    _check_run_dir(run_dir, settings, resume)
    datasets = _data(settings, tokenizer)
    with status("measuring this machine's peak matmul FLOP/s"):
        peak = measure_peak_flops(getattr(jnp, settings.compute_dtype))
    flops = train_flops_per_token(config, settings.seq_len)
    if settings.loss != "ce" and not settings.teacher_cache:
        flops += forward_flops_per_token(teacher.config, settings.seq_len)  # the teacher runs inside each step
    console.print(f"student {settings.student}: {config.param_count:,} parameters; peak {peak / 1e9:.1f} GFLOP/s")

    prepare = _prepare_fn(settings, teacher, datasets, config)
    evaluator = Evaluator(datasets.heldout_batches(max_batches=settings.eval_batches), teacher_model=teacher)
    # Only now, with every input checked, does the run directory appear.
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).write_text(settings.to_json())
    warmup = settings.warmup_steps if settings.warmup_steps is not None else max(1, settings.steps // 20)
    loop = LoopConfig(steps=settings.steps, grad_accum=settings.grad_accum, seed=settings.seed, mesh=settings.mesh,
                      checkpoint_every=settings.checkpoint_every, compute_dtype=settings.compute_dtype,
                      remat=settings.remat, eval_every=settings.eval_every,
                      optim=OptimConfig(lr=settings.lr, warmup_steps=warmup, total_steps=settings.steps))
    loss = make_loss(kind=settings.loss, alpha=settings.alpha, temperature=settings.temperature, beta=settings.beta,
                     vocab_chunk=settings.vocab_chunk, rest=settings.sparse_target == "rest")
    qat = _qat_specs(settings, config)
    graphdef, state = train(run_dir, config, datasets, loss, loop, resume=resume,
                            init_params=None if init is None else params_state(config, init),
                            prepare=prepare, evaluate=evaluator, flops_per_token=flops, peak_flops=peak,
                            param_transform=qat and fake_quantizer(qat))
    student = nnx.merge(graphdef, state.params)
    provenance = {"distill.json": json.dumps({"run": str(run_dir), **dataclasses.asdict(settings)}, indent=2)}
    save_model(student, tokenizer, run_dir / FINAL_DIR, overwrite=True, extra=provenance)
    if qat:  # the deployable student; the text perplexities below are of it
        student = _save_quantized(student, tokenizer, settings, run_dir / f"{FINAL_DIR}-{settings.qat}", provenance)
    text_ppl = {}
    for path in settings.eval_text:
        with status(f"perplexity on {path}"):
            text = Path(path).read_text(encoding="utf-8", errors="replace")
            text_ppl[Path(path).name] = perplexity(student, tokenizer, text, window=settings.seq_len).ppl
    report = _report(run_dir, settings, config, datasets, peak, flops, text_ppl, time.perf_counter() - started)
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    plot_run(run_dir)
    return report


def _qat_specs(settings: DistillSettings, config):
    if settings.qat is None:
        return None
    return tensor_specs(param_shapes(config), block_size=qat_block_size(settings.qat),
                        embeddings=settings.qat_embeddings)


def _save_quantized(student, tokenizer, settings: DistillSettings, out: Path, extra: dict):
    """RTN onto the grid the run trained for: the codes the last forward pass used."""
    from quantize.pipeline import quantize_model
    from quantize.settings import QuantizeSettings

    scheme = QuantizeSettings(block_size=qat_block_size(settings.qat), embeddings=settings.qat_embeddings)
    quant, info = quantize_model(student, tokenizer, scheme)
    save_model(quant, tokenizer, out, overwrite=True, extra=extra,
               quant_info={**info, "source": {"model": str(out.parent / FINAL_DIR), "qat": settings.qat}})
    return quant


def _report(run_dir, settings, config, datasets, peak, flops, text_ppl, seconds) -> dict:
    lines, evals = read_jsonl(run_dir / METRICS_FILE), read_jsonl(run_dir / EVAL_FILE)
    steady = lines[1:] or lines  # the first step includes compilation
    return {
        "run": run_dir.name, "loss_kind": settings.loss, "settings": dataclasses.asdict(settings),
        "student": {"config": config.to_dict(), "parameters": config.param_count, "hash": config.hash},
        "data": dataclasses.asdict(datasets.stats),
        "steps": lines[-1]["step"], "tokens_seen": lines[-1]["tokens_seen"],
        "final_loss": lines[-1]["loss"], "final_eval": evals[-1], "text_ppl": text_ppl,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "train_flops_per_token": flops, "peak_flops": peak,
        "teacher_mode": "none" if settings.loss == "ce" else ("cache" if settings.teacher_cache else "online"),
        "wall_seconds": seconds,
    }
