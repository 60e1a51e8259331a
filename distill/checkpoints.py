"""Run checkpoints: the whole TrainState (parameters, optimizer, step, RNG) and the data iterator's position.

Orbax's CheckpointManager writes each step under a temporary name and commits it by rename, so a run killed
with -9 mid-save leaves its last complete checkpoint intact; `restore` returns exactly what was saved.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from nano.errors import NanoError


class RunCheckpoints:
    def __init__(self, run_dir: str | Path, *, keep: int = 3):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state)))

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
