"""`nano distill`: one distillation run from its settings, start to finish.

    RUN/run.json        the settings (a resumed run must be given the same ones)
    RUN/metrics.jsonl   one line per optimizer step: loss, ce, kd, grad_norm, lr, tokens/s, MFU
    RUN/eval.jsonl      periodic held-out perplexity, teacher–student top-1 agreement and KL
    RUN/checkpoints/    Orbax checkpoints (exact resume)
    RUN/final/          the student as a model directory (every `nano` command takes it)
    RUN/final-SCHEME/   with --qat: the student quantized to the scheme it trained for (RTN onto the same grid)
    RUN/loss_curve.png, RUN/report.json

What a run needs is built once, in a `RunContext`: the device mesh, the teacher laid out on it, the student's start
and tokenizer, the data tokenized with it, the online teacher that scores batches. `nano distill` and `nano distill
cache-teacher` both start from one. A student whose vocabulary is a trimmed subset of the teacher's (`nano prune
--vocab-size`) is trained on its own tokenization; the teacher reads the same tokens as its own ids, and its
distribution becomes one over the student's next piece (a dropped piece's probability goes to the student piece its
text begins with: `nano.scoring.fold_to_student`); the k drawn ids and "the rest" are compared (`--sparse-target`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from distill.data import Datasets, make_datasets
from distill.init import params_state, student_start
from distill.loop import LoopConfig, TrainJob, train
from distill.mfu import forward_flops_per_token, measure_peak_flops, train_flops_per_token
from distill.report import plot_run, read_jsonl
from distill.settings import (EVAL_FILE, FINAL_DIR, METRICS_FILE, REPORT_FILE, RUN_FILE, DistillSettings,
                              qat_scheme)
from distill.sharding import make_mesh, model_shardings, replicated, to_global
from distill.step import OptimConfig, fake_quantizer, model_graphdef
from distill.teacher import OnlineTeacher, make_loss, random_teacher
from distill.teacher_cache import CachedTeacher, cache_teacher, held_steps
from nano.checkpoint import TOKENIZER_FILE, flat_params, model_from_flat, param_shapes, save_model, save_model_dir
from nano.config import GEMMA3_270M, ModelConfig
from nano.errors import NanoError
from nano.evaluate import Evaluator
from nano.files import disk_full_as_error, read_text, write_text
from nano.model import Decoder
from nano.perplexity import perplexity
from nano.quant import quantize_params
from nano.resolve import embedded_teacher_dir, load_model, resolve_config
from nano.tokenizer import Tokenizer, TrimmedVocab
from nano.ui import console, status

# Settings a resumed run may change: they do not alter the trajectory.
_RESUMABLE_CHANGES = {"eval_text", "eval_every", "eval_batches", "checkpoint_every", "teacher_cache", "mesh",
                      "remat"}  # remat recomputes the same values: a run may resume with another policy


@dataclasses.dataclass
class RunContext:
    """What one run builds once from its settings and every part of it shares."""

    settings: DistillSettings
    mesh: Mesh
    teacher: Decoder  # laid out on the mesh by the partition rules: scoring and evaluation share this one copy
    student: ModelConfig
    student_params: dict | None  # the student's start (None: random initialisation)
    tokenizer: Tokenizer  # the student's, which the data is tokenized with
    vocab: TrimmedVocab | None  # the student's vocabulary inside the teacher's; None when they share one
    datasets: Datasets

    @classmethod
    def build(cls, settings: DistillSettings) -> "RunContext":
        settings.check()
        mesh = make_mesh(settings.mesh)
        verb = "initialising" if settings.random_teacher else "loading"
        with status(f"{verb} the teacher {settings.teacher}"):
            teacher, teacher_tokenizer = _load_teacher(settings, mesh)
        with status(f"loading the student {settings.student}"):
            student, params, tokenizer = student_start(settings.student, teacher_tokenizer)
        vocab = TrimmedVocab.of(tokenizer, teacher_tokenizer)
        if vocab is not None and _sparse_target(settings, True) == "rest" and settings.temperature != 1.0:
            raise NanoError("a trimmed-vocabulary student learns the teacher's full-vocabulary probabilities (the rest "
                            f"form), known at --temperature 1 only (got {settings.temperature})")
        with status("reading and tokenizing the corpus"):
            datasets = make_datasets(settings.data, tokenizer, seq_len=settings.seq_len,
                                     batch_size=settings.batch_size, seed=settings.seed,
                                     eval_paths=settings.eval_data or None)
        console.print(f"data: {datasets.stats.summary()}")
        return cls(settings, mesh, teacher, student, params, tokenizer, vocab, datasets)

    @property
    def sparse_target(self) -> str:
        return _sparse_target(self.settings, self.vocab is not None)

    @functools.cached_property
    def online_teacher(self) -> OnlineTeacher:
        s = self.settings
        return OnlineTeacher(self.teacher, k=s.top_k, mode=s.sample_mode, seed=s.seed, mesh=self.mesh,
                             vocab_chunk=s.vocab_chunk, vocab=self.vocab)

    @property
    def teacher_meta(self) -> dict:
        """What a teacher cache must have been made with for this run to read it: the teacher, how its k tokens
        were drawn, and the vocabulary they were drawn from (the student's)."""
        s = self.settings
        meta = {"teacher": self.teacher.config.hash, "k": s.top_k, "mode": s.sample_mode, "seed": s.seed,
                "dtype": s.teacher_dtype, "vocab": hashlib.sha256(self.tokenizer.proto).hexdigest()[:16]}
        if self.vocab is not None:  # how the teacher's probabilities became the student's (caches made before differ)
            meta["fold"] = "first-piece"
        return meta


def _sparse_target(settings: DistillSettings, trimmed: bool) -> str:
    return settings.sparse_target or ("rest" if trimmed else "renormalise")


def _load_teacher(settings: DistillSettings, mesh: Mesh):
    """(teacher, tokenizer): a model directory loaded in the teacher dtype and laid out on the mesh, or with
    --random-teacher a preset initialised with random weights, sharded from the start."""
    dtype = getattr(jnp, settings.teacher_dtype)
    if not settings.random_teacher:
        teacher, tokenizer = load_model(settings.teacher, dtype=dtype)
        graphdef, state = nnx.split(teacher)
        return nnx.merge(graphdef, jax.device_put(state, model_shardings(state, mesh))), tokenizer
    config = resolve_config(settings.teacher)
    if config.vocab_size != GEMMA3_270M.vocab_size:
        raise NanoError(f"--random-teacher needs a preset with the embedded tokenizer's {GEMMA3_270M.vocab_size:,} "
                        f"pieces; {settings.teacher} has {config.vocab_size:,}")
    tokenizer = Tokenizer.load(embedded_teacher_dir() / TOKENIZER_FILE)
    return random_teacher(config, dtype=dtype, mesh=mesh, seed=settings.seed), tokenizer


def run_cache_teacher(settings: DistillSettings, out: str | Path):
    """`nano distill cache-teacher`: the teacher's sparse distribution for the first `steps` steps of a run with
    these data settings, written to `out` (resumable)."""
    ctx = RunContext.build(settings)
    return cache_teacher(out, ctx.datasets, ctx.online_teacher, steps=settings.steps,
                         grad_accum=settings.grad_accum, meta=ctx.teacher_meta)


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


def _prepare_fn(ctx: RunContext):
    """The loop's prepare(batch, step, params): on-policy samples, then the teacher's sparse distribution."""
    s = ctx.settings
    if s.loss == "ce":
        return None
    scorer = ctx.online_teacher
    if s.teacher_cache:
        scorer = CachedTeacher(s.teacher_cache, datasets=ctx.datasets, grad_accum=s.grad_accum, k=s.top_k,
                               meta=ctx.teacher_meta)
        missing = sorted(set(range(s.steps)) - set(held_steps(s.teacher_cache)))
        if missing:  # found now rather than after hours of training
            raise NanoError(f"the teacher cache {s.teacher_cache} lacks {len(missing)} of this run's {s.steps} steps "
                            f"(from step {missing[0]}); extend it with `nano distill cache-teacher --steps "
                            f"{s.steps}` and the same data options")
    on_policy = None
    if s.on_policy_fraction > 0:
        from distill.onpolicy import OnPolicy

        on_policy = OnPolicy(model_graphdef(ctx.student), ctx.student, fraction=s.on_policy_fraction, seed=s.seed)

    def prepare(batch, step, params):
        if on_policy is not None and on_policy.is_on_policy(step):
            return ctx.online_teacher(on_policy(batch, step, params), step)  # new tokens: only a live teacher
        return scorer(batch, step)

    return prepare


def _job(ctx: RunContext) -> TrainJob:
    """The training job of this run: the student, its loss and schedule, the teacher's part, the evaluation."""
    s, config = ctx.settings, ctx.student
    with status("measuring this machine's peak matmul FLOP/s"):
        peak = measure_peak_flops(getattr(jnp, s.compute_dtype))
    flops = train_flops_per_token(config, s.seq_len)
    if s.loss != "ce" and not s.teacher_cache:
        flops += forward_flops_per_token(ctx.teacher.config, s.seq_len)  # the teacher runs inside each step
    console.print(f"student {s.student}: {config.param_count:,} parameters; peak {peak / 1e9:.1f} GFLOP/s")
    warmup = s.warmup_steps if s.warmup_steps is not None else max(1, s.steps // 20)
    loop = LoopConfig(steps=s.steps, grad_accum=s.grad_accum, seed=s.seed, checkpoint_every=s.checkpoint_every,
                      compute_dtype=s.compute_dtype, remat=s.remat, eval_every=s.eval_every,
                      optim=OptimConfig(lr=s.lr, warmup_steps=warmup, total_steps=s.steps))
    loss = make_loss(kind=s.loss, alpha=s.alpha, temperature=s.temperature, beta=s.beta, vocab_chunk=s.vocab_chunk,
                     rest=ctx.sparse_target == "rest")
    qat = _qat_specs(s, config)
    heldout = to_global(ctx.datasets.heldout_batches(max_batches=s.eval_batches), replicated(ctx.mesh))
    evaluator = Evaluator(heldout, teacher_model=ctx.teacher,
                          token_bytes=ctx.tokenizer.token_bytes, vocab=ctx.vocab)
    init = ctx.student_params
    return TrainJob(config, ctx.datasets, loss, loop, mesh=ctx.mesh,
                    init_params=None if init is None else params_state(config, init),
                    prepare=_prepare_fn(ctx), evaluate=evaluator,
                    param_transform=qat and fake_quantizer(qat), flops_per_token=flops, peak_flops=peak)


def distill(settings: DistillSettings, run_dir: str | Path, *, resume: bool = False) -> dict:
    """Run (or resume) one distillation; returns the report (also written to RUN/report.json)."""
    settings.check()
    run_dir = Path(run_dir)
    if settings.teacher_cache and not (Path(settings.teacher_cache) / "manifest.json").exists():
        raise NanoError(f"--teacher-cache {settings.teacher_cache} is not a teacher cache (no manifest.json); "
                        f"make one with `nano distill cache-teacher`")
    _check_run_dir(run_dir, settings, resume)
    if jax.process_count() > 1:
        if settings.on_policy_fraction > 0:
            raise NanoError("--on-policy-fraction runs in one process only (its sampler reads the whole batch)")
        multihost_utils.sync_global_devices("run directory checked")  # by every process before one writes it
    primary = jax.process_index() == 0  # writes the run's files; every process computes the same
    started = time.perf_counter()
    ctx = RunContext.build(settings)
    job = _job(ctx)
    # Only now, with every input checked, does the run directory appear.
    if primary:
        write_text(run_dir / RUN_FILE, settings.to_json())
    with disk_full_as_error(where=run_dir, then="continue the run with --resume"):
        return _train_and_save(ctx, job, run_dir, resume=resume, primary=primary, started=started)


def _train_and_save(ctx: RunContext, job: TrainJob, run_dir: Path, *, resume: bool, primary: bool,
                    started: float) -> dict:
    """Train, then write the student and the report (process 0; the others compute the same and return {})."""
    settings = ctx.settings
    graphdef, state = train(job, run_dir, resume=resume)
    # On the host, whole: the parameters may be split over devices of several processes.
    student = nnx.merge(graphdef, multihost_utils.process_allgather(state.params, tiled=True))
    provenance = {"distill.json": json.dumps({"run": str(run_dir), **dataclasses.asdict(settings)}, indent=2)}
    if primary:
        save_model(student, ctx.tokenizer, run_dir / FINAL_DIR, overwrite=True, extra=provenance)
    if settings.qat:  # the deployable student; the text figures below are of it
        student = _save_quantized(student, ctx.tokenizer, settings, run_dir / f"{FINAL_DIR}-{settings.qat}",
                                  provenance, write=primary)
    texts = {}
    for path in settings.eval_text:
        with status(f"perplexity on {path}"):
            texts[Path(path).name] = perplexity(student, ctx.tokenizer, read_text(path), window=settings.seq_len)
    if not primary:
        return {}
    report = _report(run_dir, ctx, job, texts, time.perf_counter() - started)
    write_text(run_dir / REPORT_FILE, json.dumps(report, indent=2))
    plot_run(run_dir)
    return report


def _qat_specs(settings: DistillSettings, config):
    if settings.qat is None:
        return None
    return qat_scheme(settings.qat).tensor_specs(param_shapes(config), embeddings=settings.qat_embeddings)


def _save_quantized(student, tokenizer, settings: DistillSettings, out: Path, extra: dict, *, write: bool):
    """RTN onto the grid the run trained for: the codes the last forward pass used."""
    scheme = qat_scheme(settings.qat)
    params = quantize_params(flat_params(student), _qat_specs(settings, student.config))
    info = {"method": "rtn", "scheme": scheme.name, "settings": {"block_size": scheme.block_size,
                                                                  "embeddings": settings.qat_embeddings},
            "source": {"model": str(out.parent / FINAL_DIR), "qat": settings.qat}}
    if write:
        save_model_dir(student.config, params, tokenizer, out, overwrite=True, extra=extra, quant_info=info)
    return model_from_flat(student.config, params)


def _report(run_dir: Path, ctx: RunContext, job: TrainJob, texts: dict, seconds: float) -> dict:
    settings, config = ctx.settings, ctx.student
    lines, evals = read_jsonl(run_dir / METRICS_FILE), read_jsonl(run_dir / EVAL_FILE)
    steady = lines[1:] or lines  # the first step includes compilation
    return {
        "run": run_dir.name, "loss_kind": settings.loss, "settings": dataclasses.asdict(settings),
        "sparse_target": ctx.sparse_target if settings.loss != "ce" else None,
        "student": {"config": config.to_dict(), "parameters": config.param_count, "hash": config.hash},
        "data": dataclasses.asdict(ctx.datasets.stats),
        "steps": lines[-1]["step"], "tokens_seen": lines[-1]["tokens_seen"],
        "final_loss": lines[-1]["loss"], "final_eval": evals[-1],
        "text_ppl": {name: p.ppl for name, p in texts.items()},
        "text_bits_per_byte": {name: p.bits_per_byte for name, p in texts.items()},
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "train_flops_per_token": job.flops_per_token, "peak_flops": job.peak_flops,
        "teacher_mode": "none" if settings.loss == "ce" else ("cache" if settings.teacher_cache else "online"),
        "wall_seconds": seconds,
    }
