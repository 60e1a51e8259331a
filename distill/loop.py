"""The training loop: sharded steps, JSON-lines metrics, periodic checkpoints, exact resume.

A resumed run restores parameters, optimizer, step, RNG and the data iterator's position, and drops metric lines
written after its checkpoint, so `metrics.jsonl` of a killed-and-resumed run equals an uninterrupted one's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from distill.checkpoints import RunCheckpoints
from distill.sharding import make_mesh
from distill.train import LossFn, OptimConfig, init_state, make_optimizer, make_schedule, make_train_step
from nano.config import ModelConfig
from nano.ui import progress_bar

METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int
    optim: OptimConfig
    grad_accum: int = 1
    seed: int = 0
    mesh: str | None = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    compute_dtype: str = "float32"


def _next_batch(iterator, accum: int) -> dict:
    """[accum, batch, seq] arrays: `accum` consecutive data batches for one optimizer step."""
    batches = [next(iterator) for _ in range(accum)]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _truncate_metrics(path: Path, last_step: int) -> None:
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in lines))


def train(run_dir: str | Path, student: ModelConfig, datasets, loss_fn: LossFn, cfg: LoopConfig, *,
          resume: bool = False, init_params=None, on_step: Callable[[int, dict], None] | None = None,
          teacher: Callable[[dict, int], dict] | None = None):
    """Train `student` on `datasets` (distill.data.Datasets) with `loss_fn`; returns (graphdef, final state).

    `teacher(batch, step)` adds the teacher's distribution to each batch (distill.teacher).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(cfg.mesh)
    optimizer = make_optimizer(cfg.optim)
    graphdef, state = init_state(student, optimizer, seed=cfg.seed, mesh=mesh, params=init_params)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    checkpoints = RunCheckpoints(run_dir, keep=cfg.keep_checkpoints)
    data_state = None
    if resume:
        state, data_state = checkpoints.restore(state)
    iterator = datasets.train_iterator(data_state)
    metrics_path = run_dir / METRICS_FILE
    _truncate_metrics(metrics_path, int(state.step))
    step_fn = make_train_step(graphdef, optimizer, loss_fn, mesh, shardings,
                              compute_dtype=getattr(jnp, cfg.compute_dtype))
    schedule = make_schedule(cfg.optim)
    tokens_per_step = None
    with progress_bar() as bar, metrics_path.open("a") as log:
        task = bar.add_task("training", total=cfg.steps, completed=int(state.step))
        while int(state.step) < cfg.steps:
            batch = _next_batch(iterator, cfg.grad_accum)
            if teacher is not None:
                batch = teacher(batch, int(state.step))
            tokens_per_step = tokens_per_step or int(batch["weights"].size)
            start = time.perf_counter()
            state, metrics = step_fn(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            step = int(state.step)
            seconds = time.perf_counter() - start
            record = {"step": step, **metrics, "lr": float(schedule(step - 1)),
                      "tokens_per_s": tokens_per_step / seconds, "seconds": seconds}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoints.save(step, state, iterator.get_state())
            if on_step:
                on_step(step, record)
            bar.update(task, completed=step, description=f"training · loss {metrics['loss']:.3f}")
    checkpoints.close()
    return graphdef, state
