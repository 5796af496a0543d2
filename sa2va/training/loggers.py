"""Run logging for sweeps: the config each logger records, W&B naming, and mask overlays.

W&B layout (``logger=wandb``): one *group* per Hydra sweep, one *run* per job named by its
overrides, *job_type* = the overrides minus ``seed`` (the seeds of one arm share it), and the
config holds the full resolved config under ``cfg`` plus flat ablation keys (``loss.name``,
``loss.weights.bce``, ``freeze.name``, ...) that the dashboard can group by. Keys come only
from the environment (``WANDB_API_KEY``); without one the run is written offline
(``scripts/wandb_sync.sh`` uploads it later), so tests and CI never need the network.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.nn import functional as F

from sa2va.overrides import override_label, swept_keys
from sa2va.utils import safe_dirname, to_plain

# Flat config keys that name an ablation arm, plus every entry of the mappings below.
ABLATION_KEYS = (
    "model.name",
    "model.lora.r",
    "loss.name",
    "freeze.name",
    "optim.name",
    "optim.lr",
    "seed",
)
# each entry is an ablation axis: every loss weight (by the term it scales), every lr multiplier
ABLATION_MAPPINGS = ("loss.weights", "optim.lr_mult")


def ablation_keys(cfg: DictConfig) -> dict[str, Any]:
    """``{"loss.weights.bce": 1.0, ...}``: None where a config lacks a key (e.g. no LoRA)."""
    keys = {key: OmegaConf.select(cfg, key, default=None) for key in ABLATION_KEYS}
    for mapping in ABLATION_MAPPINGS:
        entries = OmegaConf.select(cfg, mapping, default=None) or {}
        keys |= {f"{mapping}.{name}": value for name, value in entries.items()}
    return keys


def hydra_meta() -> dict[str, Any]:
    """The job's overrides, config-group choices and sweep position ({} outside Hydra)."""
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {
        "overrides": list(hc.overrides.task),
        "choices": OmegaConf.to_container(hc.runtime.choices),
        "mode": hc.mode.name if hc.mode is not None else None,
        "sweep_dir": hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None,
        "job_num": OmegaConf.select(hc, "job.num", default=None),
    }


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """What every logger records: resolved config (``cfg``), flat ablation keys, ``hydra``."""
    resolved = {key: to_plain(cfg[key]) for key in cfg if key != "hydra"}
    return {"cfg": resolved, **ablation_keys(cfg), "hydra": hydra_meta()}


def log_run_config(loggers: Iterable[Logger], cfg: DictConfig) -> None:
    for logger in loggers:
        logger.log_hyperparams(run_config(cfg))


def wandb_offline() -> bool:
    """Offline unless an API key is in the environment; an explicit WANDB_MODE decides itself."""
    return "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY")


def sweep_axes(hc: DictConfig) -> set[str] | None:
    """The keys a multirun sweeps: its sweeper params and the command line's sweep overrides
    (read from the sweep's ``multirun.yaml``, written before any job starts). None outside a
    sweep."""
    if hc.mode != RunMode.MULTIRUN:
        return None
    params = hc.sweeper.get("params") or {}
    lines = [f"{key}={value}" for key, value in params.items()]
    multirun = Path(hc.sweep.dir) / "multirun.yaml"
    if multirun.is_file():
        lines += list(OmegaConf.load(multirun).hydra.overrides.task)
    return swept_keys(lines)


def job_labels() -> dict[str, str | None]:
    """W&B group / name / job_type of the current Hydra job (all None outside Hydra).

    In a sweep: name = the swept overrides ("loss=bce_dice,seed=1"), job_type = the same less
    seed; otherwise both come from all the overrides (less override_dirname's exclusions).
    """
    if not HydraConfig.initialized():
        return {"group": None, "name": None, "job_type": None}
    hc = HydraConfig.get()
    excluded = list(hc.job.config.override_dirname.exclude_keys)
    axes = sweep_axes(hc)
    name = override_label(hc.overrides.task, excluded, axes) or Path(hc.runtime.output_dir).name
    arm = override_label(hc.overrides.task, [*excluded, "seed"], axes) or hc.job.name
    group = None
    if axes is not None:
        sweep = hc.runtime.choices.get("experiment") or hc.job.name
        group = f"{sweep}-{Path(hc.sweep.dir).name}"
    # long override lists are cut, with a hash that keeps them distinct, for W&B's tables
    return {
        "group": group,
        "name": safe_dirname(name, 128),
        "job_type": safe_dirname(arm, 64),
    }


class SweepWandbLogger(WandbLogger):
    """Lightning's WandbLogger with sweep-aware defaults (see the module docstring).

    ``group``/``name``/``job_type`` left None come from the Hydra job; ``offline=None`` means
    offline unless ``WANDB_API_KEY`` is set (or ``WANDB_MODE`` says otherwise).
    """

    def __init__(
        self,
        project: str = "sa2va-oct",
        save_dir: str = ".",
        group: str | None = None,
        name: str | None = None,
        job_type: str | None = None,
        offline: bool | None = None,
        **kwargs: Any,
    ) -> None:
        labels = job_labels()
        super().__init__(
            project=project,
            save_dir=save_dir,
            name=name or labels["name"],
            group=group or labels["group"],
            job_type=job_type or labels["job_type"],
            offline=wandb_offline() if offline is None else offline,
            **kwargs,
        )


class WandbMaskImages(L.Callback):
    """At each validation end, log the first ``num_samples`` validation clips' first frame
    with predicted and ground-truth masks (``wandb.Image(..., masks=...)``) to W&B.

    The module's validation step keeps no predictions, so the model is run again on those
    few samples' batches, on every rank (a sharded model needs all of them in a forward);
    only rank zero's logger writes. Does nothing without a WandbLogger.
    """

    def __init__(self, num_samples: int = 4, threshold: float = 0.5) -> None:
        self.num_samples = num_samples
        self.threshold = threshold
        self._items: list[dict[str, Any]] = []

    def _wandb(self, trainer: L.Trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._items = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if len(self._items) >= self.num_samples or trainer.sanity_checking:
            return
        if self._wandb(trainer) is None:
            return
        with torch.no_grad():
            predictions = pl_module.model(batch).pred_masks
        names = batch.get("video_id") or [f"batch {batch_idx}"] * len(predictions)
        samples = zip(batch["g_pixel_values"], predictions, batch["masks"], names, strict=True)
        for frames, logits, target, name in samples:
            if len(self._items) < self.num_samples:
                self._items.append(self.overlay(frames[0], logits[0], target[0], f"{name} t=0"))

    def overlay(self, image: Tensor, logits: Tensor, target: Tensor, caption: str) -> dict:
        """(3, S, S) normalised image, (M, H, W) logits and masks -> a wandb.Image's parts."""
        from sa2va.model.mllm import IMAGENET_MEAN, IMAGENET_STD

        mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
        pixels = (image.float() * std + mean).clamp(0, 1)
        pixels = F.interpolate(pixels[None], target.shape[-2:], mode="bilinear")[0]
        labels = {m + 1: f"object {m + 1}" for m in range(target.shape[0])}
        masks = {"prediction": logits.sigmoid() > self.threshold, "ground_truth": target > 0.5}
        return {
            "image": (pixels.permute(1, 2, 0) * 255).byte().cpu().numpy(),
            "caption": caption,
            "masks": {
                kind: {"mask_data": class_map(mask), "class_labels": labels}
                for kind, mask in masks.items()
            },
        }

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._wandb(trainer)
        if logger is None or not self._items:
            return
        logger.log_image(
            key="val/overlays",
            images=[item["image"] for item in self._items],
            step=trainer.global_step,
            caption=[item["caption"] for item in self._items],
            masks=[item["masks"] for item in self._items],
        )
        self._items = []


def class_map(masks: Tensor) -> Any:
    """(M, H, W) booleans -> (H, W) uint8 map with object m as m + 1 (later objects on top)."""
    out = torch.zeros(masks.shape[-2:], dtype=torch.uint8, device=masks.device)
    for m, mask in enumerate(masks):
        out[mask] = m + 1
    return out.cpu().numpy()
