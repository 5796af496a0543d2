"""LightningModule: ties model -> losses -> metrics, owns the optimiser and the logging."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from sa2va.evaluation.metrics import SegmentationMetrics
from sa2va.evaluation.video_metrics import ClipMetrics
from sa2va.model.feature_cache import FeatureCache
from sa2va.model.protocol import SegmentationModel
from sa2va.training.freeze import FreezePolicy, format_parameter_table, parameter_table
from sa2va.training.losses import Sa2VALoss
from sa2va.training.optim import AdamWCosine

log = logging.getLogger(__name__)


def flat_masks(masks: list[Tensor]) -> Tensor:
    """Per-sample (T, M, H, W) tensors -> one (N, H, W) tensor."""
    return torch.cat([m.flatten(0, 1) for m in masks])


class Sa2VAModule(L.LightningModule):
    """Trains any model of the segmentation-model protocol (:mod:`sa2va.model.protocol`):
    ``forward(batch)`` -> per-sample mask logits (+ an optional LM loss)."""

    def __init__(
        self,
        model: SegmentationModel,
        loss: Sa2VALoss,
        freeze: FreezePolicy,
        optim: AdamWCosine,
        threshold: float = 0.5,
        on_nonfinite: str = "skip",
        feature_cache: bool | Mapping[str, Any] = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, SegmentationModel):
            raise TypeError(
                f"{type(model).__name__} does not implement the segmentation-model protocol "
                "(sa2va.model.protocol: config, processor, oracle_prompt, forward, "
                "prepare_inputs, predict_forward, save_pretrained_files)"
            )
        if on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"module.on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}")
        freeze.apply(model)
        if feature_cache:  # true, or FeatureCache options (max_gb, disk_dir, store_device)
            if not hasattr(model, "feature_cache"):
                raise ValueError(f"module.feature_cache: {type(model).__name__} has no cache hook")
            options = {} if feature_cache is True else dict(feature_cache)
            model.feature_cache = FeatureCache(**options)
        self.model = model
        self.loss = loss
        self.freeze = freeze
        self.optim = optim
        self.threshold = threshold
        self.on_nonfinite = on_nonfinite
        self.val_metrics = SegmentationMetrics(threshold=threshold, from_logits=True)
        self.val_clip_metrics = ClipMetrics(threshold=threshold)  # HD95, TCI over whole clips
        self.skipped_steps = 0
        self.param_table = parameter_table(model)

    # ---- steps ------------------------------------------------------------------------
    def _losses(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], list[Tensor]]:
        out = self.model(batch)
        losses = self.loss(out.pred_masks, batch["masks"], out.lm_loss, out.low_res_masks)
        return losses, out.pred_masks

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        losses, _ = self._losses(batch)
        if not torch.isfinite(losses["loss"]):
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            return self._nonfinite("loss", terms)
        batch_size = len(batch["masks"])
        terms = {f"train/loss_{k}": v.detach() for k, v in losses.items() if k != "loss"}
        self.log_dict(terms, batch_size=batch_size)
        self.log("train/loss", losses["loss"].detach(), prog_bar=True, batch_size=batch_size)
        return losses["loss"]

    def _nonfinite(self, what: str, detail: str) -> None:
        message = f"non-finite {what} at step {self.global_step} ({detail})"
        if self.on_nonfinite == "stop":
            raise FloatingPointError(message + "; set module.on_nonfinite=skip to skip such steps")
        self.skipped_steps += 1
        log.warning("%s: step skipped (%d so far)", message, self.skipped_steps)
        self.log("train/skipped_steps", float(self.skipped_steps))
        return None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.norm() for g in grads]).sum()):
            bad = [
                n
                for n, p in self.named_parameters()
                if p.grad is not None and not p.grad.isfinite().all()
            ]
            self._nonfinite(
                "gradient", f"{len(bad)} tensors, first {bad[0]}" if bad else "norm overflow"
            )
            optimizer.zero_grad(set_to_none=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses, pred_masks = self._losses(batch)
        self.log_dict(
            {f"val/{k}" if k == "loss" else f"val/loss_{k}": v for k, v in losses.items()},
            batch_size=len(batch["masks"]),
            sync_dist=True,
        )
        target = flat_masks(batch["masks"]).to(self.device)
        self.val_metrics.update(flat_masks(pred_masks), target)
        self.val_clip_metrics.update(pred_masks, batch["masks"])

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metrics.compute() | self.val_clip_metrics.compute()
        self.log_dict({f"val/{k}": v for k, v in scores.items() if k != "dice"})
        self.log("val/dice", scores["dice"], prog_bar=True)
        self.val_metrics.reset()
        self.val_clip_metrics.reset()

    # ---- set-up -----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        log.info(
            "Parameters (freeze=%s):\n%s",
            self.freeze.name,
            format_parameter_table(self.param_table),
        )
        for logger in self.loggers:
            logger.log_hyperparams(
                {
                    f"params/{row['module']}/{k}": row[k]
                    for row in self.param_table
                    for k in ("total", "trainable")
                }
            )

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = self.optim.build(
            self.model.named_parameters(), self.trainer.estimated_stepping_batches
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Everything needed to rebuild the architecture without any pretrained file."""
        checkpoint["sa2va"] = {
            "model": self.model.config,
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "freeze": self.freeze.config,
            "threshold": self.threshold,
            "skipped_steps": self.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run goes on counting its skipped steps."""
        self.skipped_steps = checkpoint.get("sa2va", {}).get("skipped_steps", 0)
