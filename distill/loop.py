"""The training loop: sharded steps, JSON-lines metrics, periodic evaluation and checkpoints, exact resume.

A resumed run restores parameters, optimizer, step, RNG and the data iterator's position, and drops metric and
eval lines written after its checkpoint, so the files of a killed-and-resumed run equal an uninterrupted one's
(up to the timing fields).

Several processes (`jax.distributed`, a mesh over all their devices) run the same loop in step: each builds the
same batches and hands its devices their share, all of them save each checkpoint together (Orbax), and process 0
alone writes the run's files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import Mesh

from distill.checkpoints import RunCheckpoints
from distill.settings import EVAL_FILE, METRICS_FILE
from distill.sharding import make_mesh, step_batch_sharding, to_global
from distill.step import (LossFn, OptimConfig, ParamTransform, init_state, make_optimizer, make_schedule,
                          make_train_step)
from nano.config import ModelConfig
from nano.ui import console, progress_bar

# prepare(batch, step, params) -> batch: fills in what the loss needs beyond the data (the teacher's sparse
# distribution, on-policy samples); `params` are the student's current parameters.
Prepare = Callable[[dict, int, object], dict]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int
    optim: OptimConfig
    grad_accum: int = 1
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    compute_dtype: str = "float32"
    remat: str = "none"
    eval_every: int = 0  # 0: only at the end (when an evaluator is given)


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """Everything one training run needs, built once by its caller (`distill.run.RunContext` for `nano distill`).

    `prepare(batch, step, params)` fills in what the loss needs beyond the data (the teacher's sparse distribution,
    on-policy samples). `evaluate(model)` runs every `config.eval_every` steps and after the last (eval.jsonl).
    With `flops_per_token` (model FLOPs per trained token) and `peak_flops`, each metrics line carries the step's
    MFU. With `param_transform` (QAT) the forward pass and the evaluation see the transformed parameters.
    `on_step(step, record)` hears every step (tests kill the process there)."""

    student: ModelConfig
    datasets: object  # distill.data.Datasets
    loss_fn: LossFn
    config: LoopConfig
    mesh: Mesh | None = None  # None: data parallel over every device
    init_params: object = None  # an nnx.State of the student's Params; None: random initialisation
    prepare: Prepare | None = None
    evaluate: Callable[[nnx.Module], dict] | None = None
    param_transform: ParamTransform | None = None
    flops_per_token: float | None = None
    peak_flops: float | None = None
    on_step: Callable[[int, dict], None] | None = None


def next_step_batch(iterator, accum: int) -> dict:
    """[accum, batch, seq] arrays: `accum` consecutive data batches for one optimizer step."""
    batches = [next(iterator) for _ in range(accum)]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _truncate(path: Path, last_step: int) -> None:
    """Keep the lines of steps up to `last_step`. A line cut short (the disk filled while it was written) ends the
    file: it and anything after it are dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            break
        if record["step"] <= last_step:
            kept.append(line + "\n")
    path.write_text("".join(kept))


def train(job: TrainJob, run_dir: str | Path, *, resume: bool = False):
    """Run (or with `resume`, continue) `job` in `run_dir`; returns (graphdef, final TrainState)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, datasets = job.config, job.datasets
    mesh = job.mesh or make_mesh(None)
    optimizer = make_optimizer(cfg.optim)
    graphdef, state = init_state(job.student, optimizer, seed=cfg.seed, mesh=mesh, params=job.init_params)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    checkpoints = RunCheckpoints(run_dir, keep=cfg.keep_checkpoints)
    data_state = None
    if resume:
        state, data_state = checkpoints.restore(state)
    iterator = datasets.train_iterator(data_state)
    metrics_path, eval_path = run_dir / METRICS_FILE, run_dir / EVAL_FILE
    primary = jax.process_index() == 0
    if primary:
        for path in (metrics_path, eval_path):
            _truncate(path, int(state.step))
    step_fn = make_train_step(graphdef, optimizer, job.loss_fn, mesh, shardings,
                              compute_dtype=getattr(jnp, cfg.compute_dtype), remat=cfg.remat,
                              param_transform=job.param_transform)
    view = job.param_transform or (lambda params: params)
    schedule = make_schedule(cfg.optim)
    tokens_per_step = cfg.grad_accum * datasets.batch_size * datasets.train.seq_len

    def run_eval(step: int) -> None:
        model = nnx.merge(graphdef, view(state.params))
        record = {"step": step, "tokens_seen": step * tokens_per_step, **job.evaluate(model)}
        if primary:
            with eval_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        console.print(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                         if k not in ("step", "tokens_seen")))

    batch_layout = step_batch_sharding(mesh)
    with progress_bar(speed=True) as bar, (metrics_path.open("a") if primary else contextlib.nullcontext()) as log:
        task = bar.add_task("training", total=cfg.steps, completed=int(state.step), speed="")
        while int(state.step) < cfg.steps:
            start = time.perf_counter()  # the whole step: data, teacher, on-policy sampling and the update
            step = int(state.step)
            batch = next_step_batch(iterator, cfg.grad_accum)
            if job.prepare is not None:
                batch = job.prepare(batch, step, state.params)
            state, metrics = step_fn(state, to_global(batch, batch_layout))
            record = {"step": step + 1, **{k: float(v) for k, v in jax.device_get(metrics).items()},
                      "lr": float(schedule(step))}
            seconds = time.perf_counter() - start
            record.update(tokens_seen=(step + 1) * tokens_per_step, tokens_per_s=tokens_per_step / seconds,
                          seconds=seconds, on_policy=bool("ce_weights" in batch))
            if job.flops_per_token and job.peak_flops:
                record["mfu"] = job.flops_per_token * record["tokens_per_s"] / job.peak_flops
            if primary:
                log.write(json.dumps(record) + "\n")
                log.flush()
            step += 1
            if job.evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                run_eval(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoints.save(step, state, iterator.get_state())
            if job.on_step:
                job.on_step(step, record)
            speed = f"{record['tokens_per_s']:,.0f} tok/s" + (f" · MFU {record['mfu']:.0%}" if "mfu" in record else "")
            bar.update(task, completed=step, speed=speed, description=f"training · loss {record['loss']:.3f}")
    checkpoints.close()
    return graphdef, state
