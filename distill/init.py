"""The student's starting point: a preset's random initialisation, a model directory's weights, or the teacher's
own layers (Minitron-style depth pruning: keep a subset of the teacher's blocks, its embedding and final norm).

    config, params = student_start("nano-micro", teacher_config)                       # random init
    config, params = student_start("gemma3-270m", teacher_config, teacher=t, keep_layers=[0, 2, 5])
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from flax import nnx

from nano.checkpoint import float_params, is_model_dir, load_model_dir, model_from_flat
from nano.config import ModelConfig, preset
from nano.errors import NanoError
from nano.model import Decoder

_WIDTHS = ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "ffn_dim")


def student_start(student: str, teacher_config: ModelConfig, *, teacher: Decoder | None = None,
                  keep_layers: list[int] | None = None) -> tuple[ModelConfig, dict[str, np.ndarray] | None]:
    """(student config, flat initial parameters or None for random init) for --student and --keep-layers."""
    params = None
    if is_model_dir(student):
        model, _ = load_model_dir(student)
        config, params = model.config, float_params(model)  # a quantized one continues from its dequantized weights
    elif Path(student).exists():
        raise NanoError(f"{student} is not a model directory (no config.json)")
    else:
        config = preset(student)
    if config.vocab_size != teacher_config.vocab_size:
        raise NanoError(f"the student's vocabulary ({config.vocab_size}) differs from the teacher's "
                        f"({teacher_config.vocab_size}); distillation compares their distributions token by token")
    if keep_layers is None:
        return config, params
    return _from_teacher_layers(config, teacher_config, teacher, keep_layers)


def _from_teacher_layers(config, teacher_config, teacher, keep):
    differ = [f"{f} {getattr(config, f)} vs {getattr(teacher_config, f)}" for f in _WIDTHS
              if getattr(config, f) != getattr(teacher_config, f)]
    if differ:
        raise NanoError(f"--keep-layers needs a student as wide as the teacher; they differ in {', '.join(differ)}")
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= teacher_config.num_layers:
        raise NanoError(f"--keep-layers must be increasing indices of the teacher's {teacher_config.num_layers} "
                        f"layers, got {keep}")
    config = dataclasses.replace(config, num_layers=len(keep))
    # A kept layer keeps its weights, so it must keep its kind: local (windowed, local rope) or global.
    teacher_types, types = teacher_config.layer_types, config.layer_types
    wrong = [i for n, i in enumerate(keep) if teacher_types[i] != types[n]]
    if wrong:
        raise NanoError(f"teacher layers {wrong} would change kind (local/global) in a {len(keep)}-layer student "
                        f"whose global layers are {[n for n, t in enumerate(types) if t == 'global']}; "
                        f"choose layers whose kinds match that pattern")
    source = float_params(teacher)
    params = {}
    for name, value in source.items():
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if int(index) not in keep:
                continue
            name = f"layers.{keep.index(int(index))}.{rest}"
        params[name] = np.asarray(value, np.float32)
    return config, params


def params_state(config: ModelConfig, params: dict[str, np.ndarray]) -> nnx.State:
    """The nnx.State of Params for distill.step.init_state's `params` argument."""
    return nnx.state(model_from_flat(config, params, source="the student's initial parameters"), nnx.Param)
