"""Typed config schemas (checked by Hydra at compose time) and start-up checks of a config.

The schemas name every key of the ``data``, ``loss`` and ``freeze`` groups with its type, so
``loss.w_mak=1`` or ``loss.w_mask=abc`` fails when the config is composed, not hours into a
run. Each yaml of those groups extends its schema (``defaults: [_schema, _self_]``); the yaml
files hold the values. A new constructor argument goes into the schema and into the yamls.

:func:`validate_config` catches combinations that compose fine but cannot train, before any
model is built.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from sa2va.training.freeze import FreezeRule, LoraSettings

# OmegaConf 2.3 reads these annotations at run time and knows `Optional[X]`, not `X | None`.
# ruff: noqa: UP007, UP045


@dataclass
class SyntheticSchema:
    """`sa2va.data.synth` generator parameters (see its DEFAULTS)."""

    num_videos: int = MISSING
    frames_per_video: int = MISSING
    image_size: int = MISSING
    seed: int = MISSING
    speckle_looks: float = MISSING
    contrast: float = MISSING


@dataclass
class DataSchema:
    """`sa2va.data.datamodule.OCTDataModule` arguments (less the processor)."""

    _target_: str = MISSING
    # plain containers reach the data module, so its saved hyper-parameters (in every
    # checkpoint) load with torch.load(weights_only=True)
    _convert_: str = "all"
    root: Optional[str] = MISSING
    annotations_file: str = MISSING
    synthetic: Optional[SyntheticSchema] = MISSING
    cache_dir: Optional[str] = MISSING
    split_ratios: list[float] = MISSING
    split_seed: int = MISSING
    shuffle_seed: int = MISSING
    clip_len: int = MISSING
    clip_stride: int = MISSING
    eval_clip_len: Optional[int] = MISSING
    max_eval_clip_len: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    num_workers: Optional[int] = MISSING
    on_bad_record: str = MISSING
    video_pattern: str = MISSING
    category_names: dict[int, str] = MISSING
    prompt_template: str = MISSING
    answer_template: str = MISSING
    hflip_prob: float = MISSING
    # the `augment` group (sa2va.data.augment.ClipAugment), or none
    augment: Optional[Any] = None
    predict_split: str = MISSING


@dataclass
class LossSchema:
    """`sa2va.training.losses.Sa2VALoss` arguments."""

    _target_: str = MISSING
    _convert_: str = "all"
    name: str = MISSING
    w_mask: float = MISSING
    w_dice: float = MISSING
    w_lang: float = MISSING
    w_focal: float = MISSING
    w_cldice: float = MISSING
    dice_eps: float = MISSING
    focal_gamma: float = MISSING
    focal_alpha: Optional[float] = MISSING
    cldice_iters: int = MISSING
    num_points: Optional[int] = MISSING
    oversample_ratio: float = MISSING
    importance_sample_ratio: float = MISSING
    mask_resolution: str = "full"  # full | low_res (SAM2 low-res logits, loss=official)


@dataclass
class FreezeSchema:
    """`sa2va.training.freeze.FreezePolicy` arguments; rules and LoRA use the policy's own
    dataclasses."""

    _target_: str = MISSING
    _convert_: str = "all"  # the policy stores its config in checkpoints
    name: str = MISSING
    default_trainable: bool = MISSING
    rules: list[FreezeRule] = field(default_factory=list)
    lora: Optional[LoraSettings] = None
    llm_last_n: Optional[int] = None


SCHEMAS: dict[str, type] = {"data": DataSchema, "loss": LossSchema, "freeze": FreezeSchema}
SCHEMA_NAME = "_schema"


def register_schemas() -> None:
    """Store each schema as `<group>/_schema`; every app calls this before Hydra composes."""
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group=group, name=SCHEMA_NAME, node=schema)


# ---------------------------------------------------------------- start-up checks


class ConfigError(ValueError):
    """A composed config that cannot train; the message says which key and why."""


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")

# a LoRA weight name as peft writes it in this model, to test the freeze rules against
LORA_PARAMETER = "mllm.model.language_model.base_model.model.layers.0.self_attn.q_proj.lora_A"


def _rule_says_trainable(name: str, default: bool, rules: list[Any]) -> bool:
    """FreezePolicy semantics for one name: the last rule whose pattern matches wins."""
    trainable = default
    for rule in rules:
        if re.search(rule["pattern"], name):
            trainable = bool(rule["trainable"])
    return trainable


def _freeze_problems(freeze: DictConfig) -> list[str]:
    rules = list(freeze.get("rules") or [])
    default = bool(freeze.get("default_trainable"))
    name = freeze.get("name")
    if not default and not freeze.get("llm_last_n") and not any(r.trainable for r in rules):
        return [f"freeze={name}: default_trainable=false and no rule trains anything"]
    if freeze.get("lora") and not _rule_says_trainable(LORA_PARAMETER, default, rules):
        return [
            f"freeze={name}: freeze.lora adds LoRA adapters but the rules keep them frozen "
            "(add {pattern: 'lora_', trainable: true})"
        ]
    return []


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, DictConfig):
        return str(strategy.get("_target_", ""))
    return str(strategy or "")


def _trainer_problems(trainer: DictConfig) -> list[str]:
    import torch

    problems = []
    strategy = _strategy_name(trainer.get("strategy")).lower()
    needs_cuda = [s for s in ("deepspeed", "fsdp") if s in strategy]
    if trainer.get("accelerator") in ("gpu", "cuda"):
        needs_cuda.append(f"accelerator={trainer.accelerator}")
    if needs_cuda and not torch.cuda.is_available():
        problems.append(
            f"trainer: {needs_cuda[0]} needs a CUDA GPU and none is visible "
            "(use trainer=default on a CPU machine)"
        )
    if "deepspeed" in strategy and trainer.get("plugins"):
        problems.append("trainer.plugins: DeepSpeed writes its own checkpoints; set plugins=null")
    interval, max_steps = trainer.get("val_check_interval"), trainer.get("max_steps", -1)
    if isinstance(interval, int) and not isinstance(interval, bool) and 0 < max_steps < interval:
        problems.append(
            f"trainer.val_check_interval={interval} > trainer.max_steps={max_steps}: "
            "validation (and best-checkpoint selection) would never run"
        )
    return problems


def _template_problems(data: DictConfig) -> list[str]:
    from sa2va.model.mllm import SEG_TOKEN
    from sa2va.model.processor import IMAGE_PLACEHOLDER

    prompt, answer = data.get("prompt_template"), data.get("answer_template")
    if prompt is None or answer is None:
        return []
    problems = []
    for key, text in (("prompt_template", prompt), ("answer_template", answer)):
        try:
            placeholders = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
        except ValueError as e:  # an unmatched brace
            problems.append(f"data.{key}={text!r}: {e} (write a literal brace as {{{{ or }}}})")
            continue
        if any(f != "name" for f in placeholders):
            problems.append(f"data.{key}={text!r}: only the {{name}} placeholder is filled in")
    if answer.count(SEG_TOKEN) != 1:
        problems.append(
            f"data.answer_template={answer!r} must hold exactly one {SEG_TOKEN} "
            "(its hidden state prompts SAM2)"
        )
    if SEG_TOKEN in prompt:
        problems.append(f"data.prompt_template={prompt!r}: {SEG_TOKEN} belongs in the answer")
    if prompt.count(IMAGE_PLACEHOLDER) > 1:
        problems.append(
            f"data.prompt_template={prompt!r}: {IMAGE_PLACEHOLDER} appears "
            f"{prompt.count(IMAGE_PLACEHOLDER)} times; the frames are inserted once"
        )
    if IMAGE_PLACEHOLDER in answer:
        problems.append(
            f"data.answer_template={answer!r}: {IMAGE_PLACEHOLDER} belongs in the prompt"
        )
    return problems


def _loss_problems(loss: DictConfig) -> list[str]:
    weights = {k: loss[k] for k in loss if str(k).startswith("w_")}
    if weights and not any(weights.values()):
        return [f"loss={loss.get('name')}: every loss weight is zero ({weights})"]
    return []


def _unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys added with ``+group.key=...`` (Hydra lets ``+`` extend even a typed node)."""
    problems = []
    for group, schema in SCHEMAS.items():
        if cfg.get(group) is not None:
            unknown = sorted(set(cfg[group]) - {f.name for f in fields(schema)})
            problems += [f"{group}.{key}: not a key of {schema.__name__}" for key in unknown]
    return problems


def _is_checkpoint_source(ckpt_path: str) -> bool:
    """A local file, a DeepSpeed folder, a URL, or one of Lightning's names for a checkpoint."""
    if ckpt_path in LIGHTNING_CKPT_NAMES or "://" in ckpt_path:
        return True
    return Path(ckpt_path).expanduser().exists()


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line per problem) for a config that cannot train."""
    problems = _unknown_keys(cfg)
    if cfg.get("freeze") is not None:
        problems += _freeze_problems(cfg.freeze)
    if cfg.get("trainer") is not None:
        problems += _trainer_problems(cfg.trainer)
    if cfg.get("data") is not None:
        problems += _template_problems(cfg.data)
    if cfg.get("loss") is not None:
        problems += _loss_problems(cfg.loss)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not _is_checkpoint_source(str(ckpt_path)):
        problems.append(f"ckpt_path={ckpt_path}: no such checkpoint file or folder")
    if problems:
        raise ConfigError("\n".join(problems))
