"""Every trainer config composes and builds what it can on a CPU; GPU-only strategies are
refused at start with one line; the gradient-checkpointing switch trains."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.configs import FAST_DATA, FAST_TRAIN
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

import sa2va.training.run
from sa2va.planning.activations import Workload, activation_bytes
from sa2va.planning.states import ParamStats, build_meta_model
from sa2va.training.config import ConfigError
from sa2va.training.run import build, train
from sa2va.utils import CONF_DIR

TRAINERS = sorted(p.stem for p in (Path(CONF_DIR) / "trainer").glob("*.yaml"))
GPU_ONLY = {"deepspeed_stage_3": DeepSpeedStrategy, "fsdp": FSDPStrategy}


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_config_composes_and_builds_on_cpu(compose_cfg, name):
    trainer_cfg = compose_cfg(f"trainer={name}").trainer
    strategy = trainer_cfg.get("strategy")
    if name in GPU_ONLY:  # Lightning runs these on CUDA only: the strategy object is built
        built = instantiate(strategy)
        assert isinstance(built, GPU_ONLY[name])
        assert trainer_cfg.num_nodes == 1 and trainer_cfg.precision == "bf16-mixed"
        return
    devices = 2 if name == "ddp" else 1
    trainer = instantiate(trainer_cfg, accelerator="cpu", devices=devices, logger=False)
    assert isinstance(trainer, L.Trainer) and trainer.num_devices == devices
    if name == "ddp":
        assert isinstance(trainer.strategy, DDPStrategy) and trainer_cfg.num_nodes == 1


def test_deepspeed_stage_3_settings():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["trainer=deepspeed_stage_3"])
    strategy = instantiate(cfg.trainer.strategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 3 and "offload_optimizer" not in zero
    assert cfg.trainer.plugins is None  # DeepSpeed writes its own checkpoint folders


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
@pytest.mark.parametrize(("name", "word"), [("deepspeed_stage_3", "deepspeed"), ("fsdp", "fsdp")])
def test_gpu_only_strategies_are_refused_at_start_with_one_line(
    compose_cfg, monkeypatch, name, word
):
    def build(cfg):
        raise AssertionError("a model was built for a strategy this machine cannot run")

    monkeypatch.setattr(sa2va.training.run, "build", build)
    cfg = compose_cfg(*FAST_TRAIN, f"trainer={name}")
    with pytest.raises(ConfigError) as info:
        train(cfg)
    message = str(info.value)
    assert message.splitlines() == [message] and f"{word} needs a CUDA GPU" in message
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["status"] == "failed" and "needs a CUDA GPU" in written["error"]


def test_gradient_checkpointing_switch_trains_lora_and_saves_memory(compose_cfg):
    cfg = compose_cfg("freeze=official", "model.gradient_checkpointing=true", *FAST_DATA)
    module, datamodule = build(cfg)
    assert module.model.mllm.model.language_model.is_activation_checkpointing
    datamodule.setup()
    module.train()
    module._losses(next(iter(datamodule.train_dataloader())))[0]["loss"].backward()
    lora = [p for n, p in module.model.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)

    meta = build_meta_model(cfg.model, cfg.freeze)
    stats, work = ParamStats.of(meta), Workload(4, 1, 1, 1, 1, 64)
    llm = [
        activation_bytes(meta, stats, cfg.model, work, 4, ckpt, decoder_elements=0).llm
        for ckpt in (False, True)
    ]
    assert 0 < llm[1] < llm[0]
