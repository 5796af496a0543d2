"""W&B logging (sa2va.training.loggers), offline: labels, logged config, mask images; and a
reader for offline runs, used by the sweep tests (tests/test_sweep.py)."""

from __future__ import annotations

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sa2va.training.loggers import (
    WandbMaskImages,
    ablation_keys,
    class_map,
    job_labels,
    run_config,
    wandb_offline,
)


def test_offline_unless_a_key_is_set(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_offline()
    monkeypatch.setenv("WANDB_API_KEY", "from-the-environment")
    assert not wandb_offline()
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's explicit choice is left to wandb
    assert not wandb_offline()


def test_sweep_labels_come_from_the_swept_overrides(compose_cfg, tmp_path):
    # the job `loss=bce_dice model=sa2va_tiny seed=1` of
    # `-m experiment=ablate_loss model=sa2va_tiny,unet trainer.max_steps=4`
    sweep_dir = tmp_path / "multirun"
    sweep_dir.mkdir()
    command_line = ["experiment=ablate_loss", "model=sa2va_tiny,unet", "trainer.max_steps=4"]
    multirun = {"hydra": {"overrides": {"task": command_line}}}
    OmegaConf.save(OmegaConf.create(multirun), sweep_dir / "multirun.yaml")
    job = ["experiment=ablate_loss", "loss=bce_dice", "model=sa2va_tiny", "seed=1"]
    compose_cfg(*job, "trainer.max_steps=4", f"hydra.sweep.dir={sweep_dir}")
    assert job_labels() == {
        "group": "ablate_loss-multirun",
        "name": "loss=bce_dice,model=sa2va_tiny,seed=1",
        "job_type": "loss=bce_dice,model=sa2va_tiny",
    }


def test_logger_config_builds_an_offline_sweep_logger(compose_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg("logger=wandb", "loss=bce_lang")
    assert set(cfg.logger) == {"csv", "wandb"}
    logger = instantiate(cfg.logger.wandb)  # lazy: no wandb.init, no network
    assert logger._offline and logger._wandb_init["name"] == "loss=bce_lang"
    assert logger._wandb_init["group"] is None  # a single run has no sweep group
    assert logger._wandb_init["job_type"] == "loss=bce_lang"
    assert instantiate(cfg.callbacks.wandb_masks).threshold == cfg.module.threshold


def test_run_config_has_the_resolved_config_and_flat_ablation_keys(compose_cfg):
    cfg = compose_cfg("loss=dice_lang", "+experiment/freeze_arm=sam2_full_projector")
    logged = run_config(cfg)
    assert "hydra" not in logged["cfg"] and logged["cfg"]["loss"]["weights"]["dice"] == 1.0
    assert logged["hydra"]["choices"]["loss"] == "dice_lang"
    weights = ("loss.weights.bce", "loss.weights.dice", "loss.weights.lang")
    assert {k: logged[k] for k in weights} == {
        "loss.weights.bce": 0.0,
        "loss.weights.dice": 1.0,
        "loss.weights.lang": 0.5,
    }
    assert logged["freeze.name"] == "sam2_full" and logged["model.lora.r"] == 128
    assert logged["optim.lr_mult.text_hidden_fcs"] == 10.0
    assert ablation_keys(compose_cfg())["model.lora.r"] is None  # tiny model: no LoRA
    assert HydraConfig.initialized()


def test_mask_overlay_has_image_prediction_and_ground_truth():
    callback = WandbMaskImages(num_samples=1, threshold=0.5)
    image = torch.zeros(3, 8, 8)  # normalised zeros = the ImageNet mean colour
    logits = torch.full((2, 4, 4), -5.0)
    logits[0, :2] = 5.0
    target = torch.zeros(2, 4, 4)
    target[1, 3] = 1
    item = callback.overlay(image, logits, target, "video t=0")
    assert item["image"].shape == (4, 4, 3) and item["image"].dtype.name == "uint8"
    prediction = item["masks"]["prediction"]
    assert (prediction["mask_data"][:2] == 1).all() and (prediction["mask_data"][2:] == 0).all()
    assert (item["masks"]["ground_truth"]["mask_data"][3] == 2).all()
    assert prediction["class_labels"] == {1: "object 1", 2: "object 2"}
    overlap = torch.ones(2, 2, 2, dtype=torch.bool)
    assert (class_map(overlap) == 2).all()  # later objects on top
