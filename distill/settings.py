"""The settings of one distillation run (`nano distill`'s options), kept free of JAX imports so the command line
starts fast; `distill.run` carries them out. RUN/run.json holds them, and a resumed run must match.
"""

from __future__ import annotations

import dataclasses
import json

from nano.errors import NanoError
from nano.quant_scheme import EMBEDDINGS, QuantScheme

LOSS_KINDS = ("fkl", "rkl", "jsd", "ce")  # also distill.losses.KINDS
REMAT = ("none", "dots", "block")  # nano.model.REMAT_POLICIES
SPARSE_TARGETS = ("renormalise", "rest")
SAMPLE_MODES = ("sample", "top")
DTYPES = ("float32", "bfloat16")

# A run directory's files (distill.run writes them, distill.report reads them).
RUN_FILE, METRICS_FILE, EVAL_FILE, REPORT_FILE, FINAL_DIR = "run.json", "metrics.jsonl", "eval.jsonl", "report.json", "final"



def qat_scheme(name: str) -> QuantScheme:
    """The int4 scheme --qat trains for ('int4-b32', 'int4-channel'): the schemes `nano quantize` writes."""
    try:
        scheme = QuantScheme.parse(name)
    except NanoError:
        scheme = None
    if scheme is None or scheme.bits != 4:
        raise NanoError(f"--qat takes a scheme like int4-b32, int4-b128 or int4-channel, got {name!r}")
    return scheme


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    teacher: str = "gemma3-270m"
    student: str = "nano-micro"
    data: tuple[str, ...] = ("stdlib",)  # nano.documents.STDLIB: the default corpus
    eval_data: tuple[str, ...] = ()  # held-out documents; default: a split of --data
    eval_text: tuple[str, ...] = ()  # texts outside the corpus: perplexity in the report
    loss: str = "fkl"
    alpha: float = 0.0
    temperature: float = 1.0
    beta: float = 0.5
    top_k: int = 256
    sample_mode: str = "sample"  # the k teacher ids: "sample" (by teacher probability) or "top"
    # The teacher over its k ids ("renormalise"), or k ids + the rest ("rest"); None: "rest" for a student whose
    # vocabulary is trimmed (the teacher's mass on the pieces it lacks is part of the rest), else "renormalise".
    sparse_target: str | None = None
    teacher_cache: str | None = None
    on_policy_fraction: float = 0.0
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int | None = None  # default: 5% of the steps
    mesh: str | None = None
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 4
    checkpoint_every: int = 50
    compute_dtype: str = "float32"
    remat: str = "none"  # nano.model.REMAT_POLICIES
    teacher_dtype: str = "float32"
    random_teacher: bool = False  # --teacher is a preset initialised with random weights (throughput runs)
    vocab_chunk: int = 16384
    qat: str | None = None  # quantization-aware training for this scheme, e.g. "int4-b32"
    qat_embeddings: str = "int8"  # the tied embedding under --qat: int8 per row, int4 in the scheme's blocks, float

    def check(self) -> None:
        if self.loss not in LOSS_KINDS:
            raise NanoError(f"--loss must be one of {', '.join(LOSS_KINDS)}, got {self.loss!r}")
        if not 0 <= self.alpha <= 1 or self.temperature <= 0 or not 0 < self.beta < 1:
            raise NanoError("--alpha must be in [0, 1], --temperature positive and --beta in (0, 1)")
        if not 0 <= self.on_policy_fraction <= 1:
            raise NanoError(f"--on-policy-fraction must be in [0, 1], got {self.on_policy_fraction}")
        if self.loss == "ce" and (self.teacher_cache or self.on_policy_fraction):
            raise NanoError("--loss ce trains on the data alone; --teacher-cache and --on-policy-fraction need a "
                            "distillation loss (fkl, rkl or jsd)")
        if min(self.steps, self.batch_size, self.seq_len, self.grad_accum, self.top_k, self.checkpoint_every) < 1:
            raise NanoError("--steps, --batch-size, --seq-len, --grad-accum, --top-k and --checkpoint-every must be "
                            "positive")
        if self.sample_mode not in SAMPLE_MODES:
            raise NanoError(f"--sample-mode must be one of {', '.join(SAMPLE_MODES)}, got {self.sample_mode!r}")
        if self.sparse_target is not None and self.sparse_target not in SPARSE_TARGETS:
            raise NanoError(f"--sparse-target must be one of {', '.join(SPARSE_TARGETS)}, got {self.sparse_target!r}")
        if self.sparse_target == "rest" and self.temperature != 1.0:
            raise NanoError("--sparse-target rest compares full-vocabulary probabilities, which the teacher gives at "
                            f"--temperature 1 only (got {self.temperature})")
        if self.qat is not None:
            qat_scheme(self.qat)
        if self.qat_embeddings not in EMBEDDINGS:
            raise NanoError(f"--qat-embeddings must be one of {', '.join(EMBEDDINGS)}, got {self.qat_embeddings!r}")
        if self.qat is None and self.qat_embeddings != "int8":
            raise NanoError("--qat-embeddings sets the embedding's form under --qat; pass --qat SCHEME too")
        if self.remat not in REMAT:
            raise NanoError(f"--remat must be one of {', '.join(REMAT)}, got {self.remat!r}")
        for dtype in (self.compute_dtype, self.teacher_dtype):
            if dtype not in DTYPES:
                raise NanoError(f"dtypes are float32 or bfloat16, got {dtype!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "DistillSettings":
        data = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
