"""The student's starting point: a preset's random initialisation, or a model directory's weights (a pruned
teacher from `nano prune`, an earlier run's student, a quantized model's dequantized weights).

    config, params, tokenizer = student_start("nano-micro", teacher_tokenizer)   # random init, the teacher's vocab
    config, params, tokenizer = student_start("runs/pruned", teacher_tokenizer)  # its weights and its vocabulary
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from nano.checkpoint import float_params, is_model_dir, load_model_dir, model_from_flat
from nano.config import ModelConfig, preset
from nano.errors import NanoError
from nano.tokenizer import Tokenizer


def student_start(student: str, teacher_tokenizer: Tokenizer) -> tuple[ModelConfig, dict | None, Tokenizer]:
    """(student config, flat initial parameters or None for random init, the student's tokenizer)."""
    if is_model_dir(student):
        model, tokenizer = load_model_dir(student)
        return model.config, float_params(model), tokenizer  # a quantized one continues from its dequantized weights
    if Path(student).exists():
        raise NanoError(f"{student} is not a model directory (no config.json)")
    config = preset(student)
    if config.vocab_size != teacher_tokenizer.vocab_size:
        raise NanoError(f"preset {student} has a {config.vocab_size:,}-piece vocabulary and the teacher's tokenizer "
                        f"{teacher_tokenizer.vocab_size:,}: a random-init student takes its teacher's vocabulary "
                        "(trim one with `nano prune --vocab-size`)")
    return config, None, teacher_tokenizer


def params_state(config: ModelConfig, params: dict[str, np.ndarray]) -> nnx.State:
    """The nnx.State of Params for distill.step.init_state's `params` argument."""
    return nnx.state(model_from_flat(config, params, source="the student's initial parameters"), nnx.Param)
