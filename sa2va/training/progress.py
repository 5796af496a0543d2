"""Training progress in optimiser steps (``step 120/600``) instead of epochs."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimiser steps up to ``max_steps`` across epochs.

    Runs here are step-based (``max_steps`` with ``max_epochs=-1``), where the stock bar reads
    ``Epoch 37/-2`` and starts again at every epoch. Without ``max_steps`` it is the stock bar.
    """

    def _steps(self) -> bool:
        return self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._steps():
            return super()._get_train_description(current_epoch)
        return f"{'step':{len(self.validation_description)}}"  # as wide: no flicker

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # resets the bar to 0
        if self._steps():
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, i)
        if self._steps():
            self._update(self.train_progress_bar_id, trainer.global_step)
