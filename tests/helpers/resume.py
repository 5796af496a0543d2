"""Interrupted-and-resumed training runs compared with uninterrupted ones."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from helpers.configs import FAST_DATA
from sa2va.training.run import train

# 6 training frames in batches of 2: 3 batches per epoch, so 8 steps cross 2 epoch ends, a
# crash at step 5 lands mid-epoch and the last validation (step 8) comes after the resume.
# last.ckpt is rewritten after every step.
RESUMABLE = [
    *FAST_DATA,
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.resume_checkpoint.every_n_train_steps=1",
]


def uninterrupted(
    compose_cfg: Callable[..., DictConfig], overrides: tuple[str, ...]
) -> tuple[dict, dict]:
    """Summary and last.ckpt of an uninterrupted RESUMABLE run with ``overrides``.

    Trained in each test, not once per session: a model built after other tests in the same
    process has been seen to start from other frozen weights (vision ``cls_token``).
    """
    cfg = compose_cfg(*RESUMABLE, *overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = f"{cfg.paths.output_dir}-uninterrupted"
    return train(cfg), last_checkpoint_meta(cfg.paths.output_dir)


def assert_same_end(summary: dict, run_dir: Path, expected_summary: dict, expected: dict) -> None:
    """The run in ``run_dir`` (which returned ``summary``) ended where the uninterrupted run
    did: weights, optimiser and scheduler state bit for bit, the same metrics."""
    got = last_checkpoint_meta(run_dir)
    assert got["global_step"] == expected["global_step"] == 8
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    for name, value in expected["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], value, rtol=0, atol=0, msg=name)
    (got_opt,), (expected_opt,) = got["optimizer_states"], expected["optimizer_states"]
    assert got_opt["param_groups"] == expected_opt["param_groups"]
    torch.testing.assert_close(got_opt["state"], expected_opt["state"], rtol=0, atol=0)
    assert got["lr_schedulers"] == expected["lr_schedulers"]
    assert summary["metrics"] == expected_summary["metrics"]
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["status"] == "completed" and written["global_step"] == 8


# Random flips and dropout both on: the global RNG and each sample's augmentation must
# continue exactly across a resume.
RANDOM = ("data.hflip_prob=0.5", "model.projector.dropout=0.1")


def last_checkpoint_meta(run: str | Path) -> dict:
    return torch.load(Path(run) / "checkpoints" / "last.ckpt", weights_only=True)
