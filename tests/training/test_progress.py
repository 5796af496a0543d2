"""The training bar counts optimiser steps to max_steps across epochs (not `Epoch 37/-2`)."""

from __future__ import annotations

from helpers.configs import FAST_TRAIN
from lightning.pytorch.callbacks import Callback

from sa2va.training.progress import StepProgressBar
from sa2va.training.run import build, build_trainer


class Probe(Callback):
    """What the step bar shows after each training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float, str, int]] = []

    def on_train_batch_end(self, trainer, *_):
        bar = trainer.progress_bar_callback
        task = bar.progress.tasks[bar.train_progress_bar_id]
        self.seen.append((task.completed, task.total, task.description, trainer.current_epoch))


def test_step_bar_counts_steps_across_epochs(compose_cfg, tmp_path):
    cfg = compose_cfg(*FAST_TRAIN, "trainer.enable_progress_bar=true", "trainer.max_steps=5",
                      "+trainer.limit_val_batches=0", "logger=none")  # fmt: skip
    module, datamodule = build(cfg)
    trainer = build_trainer(cfg, tmp_path)
    probe = Probe()
    trainer.callbacks.append(probe)
    assert isinstance(trainer.progress_bar_callback, StepProgressBar)
    trainer.fit(module, datamodule=datamodule)
    assert [s[0] for s in probe.seen] == [1, 2, 3, 4, 5]
    assert {s[1] for s in probe.seen} == {5} and probe.seen[-1][3] > 0  # one bar over epochs
    assert all(s[2].strip() == "step" for s in probe.seen)


def test_no_bar_when_the_trainer_has_none(compose_cfg, tmp_path):
    cfg = compose_cfg(*FAST_TRAIN, "logger=none")  # FAST_TRAIN: enable_progress_bar=false
    trainer = build_trainer(cfg, tmp_path)
    assert trainer.progress_bar_callback is None
