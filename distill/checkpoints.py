"""Run checkpoints: the whole TrainState (parameters, optimizer, step, RNG) and the data iterator's position.

Orbax's CheckpointManager writes each step under a temporary name and commits it by rename, so a run killed
with -9 mid-save leaves its last complete checkpoint intact; `restore` returns exactly what was saved.

Saves are synchronous: a save that fails (a full disk) fails in its own step, named, with the last complete
checkpoint intact and the half-written one removed, instead of surfacing steps later from a background thread.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from nano.checkpoint import quiet_orbax
from nano.errors import NanoError
from nano.files import DiskFull, is_disk_full


def committed_steps(run_dir: str | Path) -> list[int]:
    """The steps whose checkpoint is complete, read from the directory names alone (no Orbax: this also serves a
    process whose distributed runtime has failed). Orbax writes a step under a temporary name and renames it to
    the bare step number when committed."""
    directory = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


class RunCheckpoints:
    def __init__(self, run_dir: str | Path, *, keep: int = 3):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        # cleanup_tmp_directories: a save killed or failed mid-way leaves a temporary directory; the next start
        # removes it (it is never read as a checkpoint either way).
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        try:
            with quiet_orbax():
                self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                data=ocp.args.JsonSave(data_state)))
        except Exception as e:
            if not is_disk_full(e):
                raise
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)  # give back what the failed save took
            last = committed_steps(self.directory.parent)
            kept = f"the last complete one is step {last[-1]}" if last else "no earlier checkpoint exists"
            raise DiskFull(self.directory, f"the checkpoint of step {step} was not written and {kept}",
                           then="continue with --resume") from None

    def restore(self, abstract_state):
        """(state, data_state) of the latest checkpoint, placed with `abstract_state`'s shardings."""
        step = self.latest_step()
        if step is None:
            raise NanoError(f"--resume: no checkpoint in {self.directory}")
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                      data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
