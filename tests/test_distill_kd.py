"""End to end on `tiny`: an online teacher's sparse distribution through the chunked loss in the real train step.

A student trained with forward KL towards a (random) teacher must end closer to that teacher than one trained on
the data alone, at equal steps and tokens.
"""

import pytest
from flax import nnx

from distill.data import make_datasets
from distill.loop import LoopConfig, TrainJob, train
from distill.losses import distill_loss
from distill.teacher import OnlineTeacher, make_loss
from distill.step import OptimConfig
from nano.config import TINY
from nano.model import init_model

pytestmark = pytest.mark.slow  # exports, engines, imports or training runs: `make check` skips them


@pytest.fixture(scope="module")
def setting(tmp_path_factory, tiny_tokenizer):
    from hf_tiny import training_text

    corpus = tmp_path_factory.mktemp("kd") / "text.txt"
    corpus.write_text("\n".join(training_text(lines=800)))
    data = make_datasets([corpus], tiny_tokenizer, seq_len=32, batch_size=8, seed=0, heldout_fraction=0.0)
    teacher = init_model(TINY, seed=123)
    return data, teacher, tmp_path_factory.mktemp("runs")


def _train(setting, kind):
    data, teacher_model, runs = setting
    cfg = LoopConfig(steps=25, optim=OptimConfig(lr=1e-2, warmup_steps=3, total_steps=25), checkpoint_every=25)
    teacher = OnlineTeacher(teacher_model, k=64, mode="sample", seed=0)
    prepare = None if kind == "ce" else (lambda batch, step, _: teacher(batch, step))
    graphdef, state = train(TrainJob(TINY, data, make_loss(kind=kind, vocab_chunk=128), cfg, prepare=prepare),
                            runs / kind)
    return nnx.merge(graphdef, state.params)


def _kl_to_teacher(student, teacher, batch):
    t_logits, _ = teacher(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
    s_logits, _ = student(batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"])
    _, metrics = distill_loss(s_logits, batch["targets"], batch["weights"], t_logits, kind="fkl")
    return float(metrics["kd"])


def test_kd_student_is_closer_to_its_teacher_than_ce_student(setting):
    data, teacher, _ = setting
    kd_student, ce_student = _train(setting, "fkl"), _train(setting, "ce")
    batch = next(data.train_iterator())
    kd, ce = _kl_to_teacher(kd_student, teacher, batch), _kl_to_teacher(ce_student, teacher, batch)
    print(f"KL to teacher: fkl student {kd:.3f}, ce student {ce:.3f}")
    assert kd < 0.8 * ce, (kd, ce)
