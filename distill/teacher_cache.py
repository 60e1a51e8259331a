"""The offline teacher cache: the teacher's sparse distribution computed once, reused by many student runs.

Layout of a cache directory:

    manifest.json              {"format": 1, "data_fingerprint", "batch_size", "seq_len", "grad_accum", "k",
                                "meta": <the caller's dict: teacher config hash, k, mode, seed, ...>}
    shards/step_0000000.npz    one per optimizer step: tokens [accum, B, S] int32 (to verify the batch),
                               teacher_ids int32 and teacher_logprobs float32 [accum, B, S, k]

Shard n holds what `teacher(batch, n)` returned for the n-th batch the training loop builds (a fresh
`datasets.train_iterator()`, `grad_accum` batches stacked per step), so a student run with the same data
fingerprint and grad_accum reads exactly the distribution an online teacher would have given it.

Every file is written to a temporary name in its directory, fsynced and renamed, so a killed `cache_teacher`
leaves only whole shards under final names; it resumes by skipping them, and extends the cache when given a
larger `steps`. `CachedTeacher` is a drop-in for `OnlineTeacher` in `distill.loop.train`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import zipfile
from pathlib import Path

import numpy as np

from distill.loop import next_step_batch  # the loop's own stacking, so the cache's step n is the loop's step n
from nano.errors import NanoError
from nano.files import atomic_write, directory_bytes, disk_full_as_error
from nano.ui import progress_bar

FORMAT = 1
MANIFEST = "manifest.json"
_DATA_FIELDS = ("data_fingerprint", "batch_size", "seq_len", "grad_accum")


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    directory: Path
    steps: int      # steps the cache holds (0..steps-1)
    computed: int   # of which this call ran the teacher for
    tokens: int     # tokens covered by the cache
    bytes: int      # size on disk
    seconds: float  # wall time of this call


def shard_path(cache_dir: str | Path, step: int) -> Path:
    return Path(cache_dir) / "shards" / f"step_{step:07d}.npz"


def held_steps(cache_dir: str | Path) -> list[int]:
    """Steps with a shard under its final name (temporaries start with '.' and never match)."""
    return sorted(int(p.stem[5:]) for p in (Path(cache_dir) / "shards").glob("step_*.npz"))


def _describe(steps: list[int]) -> str:
    if not steps:
        return "no steps"
    if steps == list(range(steps[0], steps[-1] + 1)):
        return f"steps {steps[0]}..{steps[-1]}"
    return f"{len(steps)} steps between {steps[0]} and {steps[-1]} (with gaps)"


def _read_manifest(cache_dir: Path) -> dict | None:
    path = cache_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NanoError(f"teacher cache manifest {path} is unreadable ({e}); delete the cache and rebuild it") from e
    if manifest.get("format") != FORMAT:
        raise NanoError(f"teacher cache {cache_dir} has format {manifest.get('format')}, this nano reads format "
                        f"{FORMAT}; rebuild it with `nano distill cache-teacher`")
    return manifest


def _differences(old: dict, new: dict) -> list[str]:
    fields = [f for f in (*_DATA_FIELDS, "k") if new.get(f) is not None and old.get(f) != new[f]]
    meta_old, meta_new = old.get("meta", {}), new.get("meta", {})
    fields += [f"meta.{key}" for key in sorted(set(meta_old) | set(meta_new)) if meta_old.get(key) != meta_new.get(key)]
    return fields


def cache_teacher(out_dir: str | Path, datasets, teacher, *, steps: int, grad_accum: int = 1,
                  meta: dict) -> CacheInfo:
    """Write shards for optimizer steps 0..steps-1 into `out_dir`, skipping those already there."""
    start = time.perf_counter()
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for stray in (out / "shards").glob(".*.tmp"):  # left by a killed run; never read as a shard
        stray.unlink()
    meta = json.loads(json.dumps(meta))  # as it will read back from JSON, so comparisons are like for like
    manifest = {"format": FORMAT, "data_fingerprint": datasets.fingerprint, "batch_size": datasets.batch_size,
                "seq_len": datasets.train.seq_len, "grad_accum": grad_accum, "k": meta.get("k"), "meta": meta}
    old = _read_manifest(out)
    if old is None and held_steps(out):
        raise NanoError(f"{out} holds teacher shards but no {MANIFEST}; delete the directory and rebuild the cache")
    if old is not None:
        if diff := _differences(old, manifest):
            raise NanoError(f"teacher cache {out} was built with other settings ({', '.join(diff)} differ); use "
                            "a new cache directory or the original settings")
        manifest = old
    held = set(held_steps(out))
    todo = [s for s in range(steps) if s not in held]
    tokens_per_step = grad_accum * datasets.batch_size * datasets.train.seq_len
    iterator = datasets.train_iterator()
    resumable = disk_full_as_error(then="run the same command again: it keeps the whole shards and computes the rest")
    with resumable, progress_bar(speed=True) as progress:
        task = progress.add_task("teacher cache", total=len(todo), speed="")
        for step in range(steps):
            batch = next_step_batch(iterator, grad_accum)  # always drawn, so later steps keep the loop's order
            if step in held:
                continue
            t0 = time.perf_counter()
            result = teacher(batch, step)
            ids = np.asarray(result["teacher_ids"], np.int32)
            logprobs = np.asarray(result["teacher_logprobs"], np.float32)
            if manifest["k"] is None:  # k not in meta: the first computed shard decides
                manifest["k"] = int(ids.shape[-1])
            if ids.shape != (*batch["tokens"].shape, manifest["k"]) or logprobs.shape != ids.shape:
                raise NanoError(f"teacher returned shapes {ids.shape} / {logprobs.shape} at step {step}, expected "
                                f"{(*batch['tokens'].shape, manifest['k'])}; check the teacher's k")
            if old is None:  # the manifest precedes the first shard, so shards never exist without one
                atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)), durable=True)
                old = manifest
            arrays = {"tokens": np.asarray(batch["tokens"], np.int32), "teacher_ids": ids,
                      "teacher_logprobs": logprobs}
            atomic_write(shard_path(out, step), lambda tmp: _save_npz(tmp, arrays), durable=True)
            rate = tokens_per_step / (time.perf_counter() - t0)
            progress.update(task, advance=1, speed=f"{rate:,.0f} tok/s")
    total = len(held_steps(out))
    return CacheInfo(out, total, len(todo), total * tokens_per_step, directory_bytes(out),
                     time.perf_counter() - start)


def _save_npz(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:  # a file object: given a name without .npz, numpy would append it
        np.savez(f, **arrays)  # uncompressed: fast to read


class CachedTeacher:
    """`teacher(batch, step)` from a cache built by `cache_teacher` for the same data and grad_accum."""

    def __init__(self, cache_dir: str | Path, *, datasets, grad_accum: int = 1, k: int | None = None,
                 meta: dict | None = None):
        """`meta`: what the run's teacher settings would write (cache_teacher's `meta`); a cache made with others
        is refused, a vocabulary other than the student's first and by name."""
        self.dir = Path(cache_dir)
        manifest = _read_manifest(self.dir)
        if manifest is None:
            raise NanoError(f"no teacher cache at {self.dir} (no {MANIFEST}); build it with "
                            "`nano distill cache-teacher`")
        made = manifest.get("meta", {})
        if meta and made.get("vocab") != meta.get("vocab"):
            raise NanoError(f"the teacher cache {self.dir} was made for another vocabulary than this student's; "
                            "make one with `nano distill cache-teacher --student` this run's student")
        differ = [key for key, value in (meta or {}).items() if made.get(key) != value]
        if differ:
            raise NanoError(f"the teacher cache {self.dir} was made with other teacher settings ({', '.join(differ)} "
                            "differ); re-run `nano distill cache-teacher` with this run's settings")
        run = {"data_fingerprint": datasets.fingerprint, "batch_size": datasets.batch_size,
               "seq_len": datasets.train.seq_len, "grad_accum": grad_accum, "k": k}
        diff = [f"{f} (cache {manifest.get(f)}, run {run[f]})" for f in (*_DATA_FIELDS, "k")
                if run[f] is not None and manifest.get(f) != run[f]]
        if diff:
            raise NanoError(f"teacher cache {self.dir} does not match this run: {'; '.join(diff)}; rebuild the "
                            "cache with this run's data, batch size, seq_len, grad_accum and k")
        self.manifest = manifest

    def __call__(self, batch: dict, step: int) -> dict:
        path = shard_path(self.dir, step)
        if not path.exists():
            held = _describe(held_steps(self.dir))
            raise NanoError(f"teacher cache {self.dir} has no step {step} (it holds {held}); "
                            f"re-run `nano distill cache-teacher --steps N` with N > {step}")
        try:
            with np.load(path) as shard:
                tokens, ids, logprobs = shard["tokens"], shard["teacher_ids"], shard["teacher_logprobs"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise NanoError(f"teacher cache shard {path} is corrupt ({e}); delete it and re-run "
                            "`nano distill cache-teacher` to recompute it") from e
        if tokens.shape != batch["tokens"].shape or not np.array_equal(tokens, batch["tokens"]):
            raise NanoError(f"teacher cache shard {path} was computed for other tokens than this run's step {step}; "
                            "the data order differs: rebuild the cache for this run's data")
        return {**batch, "teacher_ids": ids, "teacher_logprobs": logprobs}
