"""Typed config groups fail at compose time; configs that cannot train fail before any model
is built, with one line per problem; secrets never reach configs or run outputs."""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.configs import FAST_TRAIN
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

import sa2va.training.run
from sa2va.data.synth import DEFAULTS as SYNTHETIC_DEFAULTS
from sa2va.model.lora import LoraSettings
from sa2va.training.config import (
    LORA_GROUP,
    SCHEMAS,
    ConfigError,
    SyntheticSchema,
    validate_config,
)
from sa2va.training.run import train
from sa2va.utils import CONF_DIR, REPO_ROOT

GROUP_OPTIONS = {
    group: sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")) for group in SCHEMAS
}


@pytest.mark.parametrize(
    "override, cause",
    [
        ("loss.w_mak=1", "Key 'w_mak' not in 'LossSchema'"),
        ("loss.weights.bce=abc", "'abc' of type 'str' could not be converted to Float"),
        ("data.batch_size=two", "could not be converted to Integer"),
        ("data.synthetic.num_video=3", "Key 'num_video' not in 'SyntheticSchema'"),
        ("freeze.default_trainable=maybe", "'maybe' is not a valid bool"),
        ("freeze.rules=[{pattern:x,trainable:maybe}]", "'maybe' is not a valid bool"),
        ("freeze=official model.lora.rank=4", "Key 'rank' not in 'LoraSettings'"),
    ],
)
def test_typos_and_wrong_types_fail_at_compose_time(compose_cfg, override, cause):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(*override.split())
    assert cause in str(info.value.__cause__)


def test_command_line_overrides_still_reach_the_objects(compose_cfg):
    cfg = compose_cfg("loss=official", "loss.weights.bce=3", "freeze=user_guide", "model.lora.r=8")
    assert instantiate(cfg.loss).weights["bce"] == 3.0
    policy = instantiate(cfg.freeze)
    lora = instantiate(cfg.model).language_model.peft_config["default"]  # LoRA is architecture
    assert policy.name == "user_guide" and lora.r == 8 and lora.lora_alpha == 128
    assert lora.target_modules  # LoraSettings' default filled in


@pytest.mark.parametrize("group", SCHEMAS)
def test_schemas_name_exactly_the_constructor_arguments(compose_cfg, group):
    """A new constructor argument must be added to its schema (and the yamls), and back."""
    target = get_class(compose_cfg()[group]._target_)
    arguments = set(inspect.signature(target).parameters) - {"processor"}
    keys = {f.name for f in fields(SCHEMAS[group])} - {"_target_", "_convert_"}
    assert keys == arguments
    assert {f.name for f in fields(SyntheticSchema)} == set(SYNTHETIC_DEFAULTS)


def restated(preset: Any, defaults: Any, prefix: str = "") -> list[str]:
    """Keys of ``preset`` whose value equals the one it would get anyway from ``defaults``
    (both compared as written: interpolations unresolved)."""
    if isinstance(preset, DictConfig):
        preset = OmegaConf.to_container(preset)
    if isinstance(defaults, DictConfig):
        defaults = OmegaConf.to_container(defaults)
    if isinstance(preset, dict) and isinstance(defaults, dict):
        return [
            found
            for key in preset
            if key != "defaults" and key in defaults
            for found in restated(preset[key], defaults[key], f"{prefix}{key}.")
        ]
    return [prefix.rstrip(".")] if preset == defaults else []


def config_path(preset: Path, entry: str) -> Path:
    """The yaml a config-path entry of ``preset``'s defaults list names (group options, e.g.
    ``sam2@model.sam2: tiny``, and ``_self_`` are not config paths)."""
    return preset.parent / f"{entry}.yaml"


def inherited(preset: Path) -> DictConfig:
    """What the config files in ``preset``'s defaults list give it (their own parents first)."""
    merged = OmegaConf.create()
    for entry in OmegaConf.load(preset).get("defaults", []):
        if isinstance(entry, str) and entry not in ("_self_", "_schema"):
            parent = config_path(preset, entry)
            own = OmegaConf.load(parent)
            own.pop("defaults", None)
            merged = OmegaConf.merge(merged, inherited(parent), own)
    return merged


@pytest.mark.parametrize("group", [*SCHEMAS, LORA_GROUP])
def test_presets_state_only_what_differs_from_the_constructor_defaults(group):
    schema = OmegaConf.structured(SCHEMAS.get(group, LoraSettings))
    for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
        defaults = OmegaConf.merge(schema, inherited(path))
        assert not restated(OmegaConf.load(path), defaults), path.name


def test_model_presets_state_only_what_differs_from_their_base():
    paths = sorted((Path(CONF_DIR) / "model").glob("*.yaml"))
    for path in paths + sorted((Path(CONF_DIR) / "model" / "base").glob("*.yaml")):
        assert not restated(OmegaConf.load(path), inherited(path)), path.name
    assert all(inherited(p) for p in paths if p.stem.startswith("sa2va_")), "one shared base"


# ------------------------------------------------------------------ validate_config

NEEDS_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["freeze=official", "freeze.rules=[]"], "no rule trains anything"),
        (["freeze.default_trainable=false"], "no rule trains anything"),
        (
            ["freeze=official", "freeze.rules=[{pattern:sam2,trainable:true}]"],
            "adds LoRA adapters but the rules keep them frozen",
        ),
        pytest.param(
            ["trainer=deepspeed_stage_3"], "deepspeed needs a CUDA GPU", marks=NEEDS_CPU_ONLY
        ),
        pytest.param(["trainer=fsdp"], "fsdp needs a CUDA GPU", marks=NEEDS_CPU_ONLY),
        pytest.param(["trainer=gpu"], "accelerator=gpu needs a CUDA GPU", marks=NEEDS_CPU_ONLY),
        (["data.answer_template=Sure."], "must hold exactly one [SEG]"),
        (["data.answer_template='[SEG] and [SEG].'"], "must hold exactly one [SEG]"),
        (["data.prompt_template='<image> Segment {name} [SEG]'"], "[SEG] belongs in the answer"),
        (["data.prompt_template='<image> {name} <image>'"], "<image> appears 2 times"),
        (["data.answer_template='<image> Sure, [SEG].'"], "<image> belongs in the prompt"),
        (["data.prompt_template='<image> Segment the {object}.'"], "only the {name} placeholder"),
        (
            ["loss.weights.bce=0", "loss.weights.dice=0", "loss.weights.lang=0"],
            "every loss weight is zero",
        ),
        (
            ["trainer.max_steps=10", "trainer.val_check_interval=20"],
            "val_check_interval=20 > trainer.max_steps=10",
        ),
        (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path=/nonexistent/last.ckpt: no such"),
        (
            ["eval_after_fit=[]", "callbacks.model_checkpoint=null"],
            "eval_after_fit: evaluates the best-val checkpoint",
        ),
        (["data.prompt_template='<image> Segment the {name'"], "expected '}' before end of string"),
        (["+loss.w_mak=1"], "loss.w_mak: not a key of LossSchema"),  # `+` may extend a schema
    ],
)
def test_a_config_that_cannot_train_is_refused_with_one_line(compose_cfg, overrides, problem):
    with pytest.raises(ConfigError) as info:
        validate_config(compose_cfg(*overrides))
    assert str(info.value).splitlines() == [str(info.value)]
    assert problem in str(info.value)


def test_every_problem_is_reported_at_once(compose_cfg):
    cfg = compose_cfg(
        "trainer=deepspeed_stage_3",
        "trainer.plugins=[{_target_:x.Y}]",
        "data.answer_template=Sure.",
    )
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    expected = ["DeepSpeed writes its own checkpoints", "exactly one [SEG]"]
    if not torch.cuda.is_available():
        expected.append("deepspeed needs a CUDA GPU")
    lines = str(info.value).splitlines()
    assert len(lines) == len(expected)
    assert all(any(e in line for line in lines) for e in expected)


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # the embedded default
        *[[f"{g}={o}"] for g, options in GROUP_OPTIONS.items() for o in options],
        # LoRA alone on a policy that freezes everything else
        ["freeze=official", "freeze.rules=[{pattern:lora_,trainable:true}]"],
        ["data.prompt_template='Please segment the {name}.'"],  # no <image>: frames go first
        ["ckpt_path=last"],  # Lightning finds it
    ],
)
def test_every_option_extends_its_schema_and_passes(compose_cfg, overrides):
    cfg = compose_cfg(*overrides)
    for group, schema in SCHEMAS.items():
        assert OmegaConf.get_type(cfg[group]) is schema, overrides
    validate_config(cfg)


def test_train_refuses_before_building_anything(compose_cfg, monkeypatch):
    def build(cfg):
        raise AssertionError("a model was built for a config that cannot train")

    monkeypatch.setattr(sa2va.training.run, "build", build)
    cfg = compose_cfg(
        *FAST_TRAIN, "loss.weights.bce=0", "loss.weights.dice=0", "loss.weights.lang=0"
    )
    with pytest.raises(ConfigError, match="every loss weight is zero"):
        train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["status"] == "failed"
    assert written["error"].startswith("ConfigError: loss=bce_dice_lang: every loss weight is zero")


# ------------------------------------------------------------------ secrets

SECRET = "dummy-secret-3f9c2a"


def test_wandb_key_from_the_environment_never_reaches_run_outputs(compose_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    cfg = compose_cfg(*FAST_TRAIN, "logger=csv", "trainer.max_steps=2")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.csv" for p in files)
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked


def test_no_config_reads_or_holds_a_wandb_key():
    for path in Path(CONF_DIR).rglob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"oc\.env:\s*WANDB_API_KEY|api_key\s*:", text), path


def test_no_code_trusts_remote_code_or_unpickles_user_files():
    for path in (REPO_ROOT / "sa2va").rglob("*.py"):
        text = path.read_text()
        # only ever to refuse it: an auto_map in config.json makes transformers ask otherwise
        uses = re.findall(r"trust_remote_code\W*\w*", text)
        assert all(u == "trust_remote_code=False" for u in uses), (path, uses)
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
