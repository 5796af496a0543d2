"""Typed config schemas (checked by Hydra at compose time) and start-up checks of a config.

The schemas name every key of the ``data``, ``loss``, ``freeze`` and ``model/lora`` groups with
its type and default, so ``loss.w_mak=1`` or ``loss.weights.bce=abc`` fails when the config is
composed, not hours into a run. Each schema is read off its component's constructor (argument
names, types and defaults): a parameter is declared once, in the constructor, and a preset yaml
(``defaults: [_schema, _self_]``) states only what differs from those defaults.

:func:`validate_config` catches combinations that compose fine but cannot train, before any
model is built; each component's own arguments are checked by the component itself.
"""

from __future__ import annotations

import inspect
import string
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field, fields, make_dataclass
from pathlib import Path
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from sa2va.data.datamodule import OCTDataModule
from sa2va.data.synth import DEFAULTS as SYNTHETIC_DEFAULTS
from sa2va.model.lora import LoraSettings
from sa2va.training.freeze import FreezePolicy, FreezeRule
from sa2va.training.losses import Sa2VALoss

# OmegaConf 2.3 reads these annotations at run time and knows `Optional[X]`, not `X | None`.
# ruff: noqa: UP007, UP045


def omegaconf_type(hint: Any) -> Any:
    """A constructor's type hint in the subset OmegaConf checks: ``X | None`` -> Optional,
    abstract containers -> list/dict, a ``Literal`` -> the type of its values."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        kinds = [omegaconf_type(a) for a in args if a is not type(None)]
        return Optional[kinds[0]] if len(kinds) == 1 else Any
    if origin is typing.Literal:
        return type(args[0])
    if origin in (Mapping, dict):
        return dict[omegaconf_type(args[0]), omegaconf_type(args[1])] if args else dict
    if origin in (Sequence, list, tuple):
        return list[omegaconf_type(args[0])] if args else list
    return hint if hint in (int, float, bool, str) else Any


def _field(default: Any) -> Any:
    """A dataclass field holding a constructor default (containers copied per instance)."""
    if default is inspect.Parameter.empty:
        return field(default=MISSING)
    if isinstance(default, Mapping):
        return field(default_factory=lambda: dict(default))
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: list(default))
    return field(default=default)


def constructor_schema(
    name: str,
    target: type,
    types_: Mapping[str, Any] | None = None,
    skip: Sequence[str] = (),
    required: Sequence[str] = (),
) -> type:
    """A structured-config dataclass of ``target``'s constructor arguments, with their types
    (``types_`` where OmegaConf should check more than the hint says) and defaults, but
    ``required`` ones, which every option must state (a yaml's ``???`` cannot undo a default)."""
    hints = typing.get_type_hints(target.__init__)
    fields_ = [
        ("_target_", str, field(default=f"{target.__module__}.{target.__qualname__}")),
        # plain containers reach the object (a data module's saved hyper-parameters, a
        # policy's config: in every checkpoint, read with torch.load(weights_only=True))
        ("_convert_", str, field(default="all")),
    ]
    for param in list(inspect.signature(target).parameters.values()):
        if param.name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        kind = (types_ or {}).get(param.name) or omegaconf_type(hints[param.name])
        default = param.empty if param.name in required else param.default
        fields_.append((param.name, kind, _field(default)))
    return make_dataclass(name, fields_)


SyntheticSchema = make_dataclass(
    "SyntheticSchema",
    [(key, type(value), field(default=value)) for key, value in SYNTHETIC_DEFAULTS.items()],
)
DataSchema = constructor_schema(
    "DataSchema",
    OCTDataModule,
    {"synthetic": Optional[SyntheticSchema]},
    skip=("processor",),
    required=("root",),  # which data set: null (synthetic) or a folder
)
LossSchema = constructor_schema("LossSchema", Sa2VALoss)
FreezeSchema = constructor_schema("FreezeSchema", FreezePolicy, {"rules": list[FreezeRule]})

# the components' groups (each option is one object: `_target_`), and the LoRA spec of the model
SCHEMAS: dict[str, type] = {"data": DataSchema, "loss": LossSchema, "freeze": FreezeSchema}
LORA_GROUP = "model/lora"
SCHEMA_NAME = "_schema"


def register_schemas() -> None:
    """Store each schema as `<group>/_schema`; every app calls this before Hydra composes."""
    store = ConfigStore.instance()
    for group, schema in {**SCHEMAS, LORA_GROUP: LoraSettings}.items():
        store.store(group=group, name=SCHEMA_NAME, node=schema)


# ---------------------------------------------------------------- start-up checks


class ConfigError(ValueError):
    """A composed config that cannot train; the message says which key and why."""


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")

# a LoRA weight name as peft writes it in this model, to test the freeze rules against
LORA_PARAMETER = "mllm.model.language_model.base_model.model.layers.0.self_attn.q_proj.lora_A"


def _component_problems(cfg: DictConfig) -> list[str]:
    """Build the loss and the freeze policy (cheap, no model): each checks its own arguments.
    Then the one check across components: LoRA adapters the freeze rules would keep frozen."""
    problems, built = [], {}
    for group in ("loss", "freeze"):
        if cfg.get(group) is not None:
            try:
                built[group] = instantiate(cfg[group])
            except InstantiationException as e:  # the component's own message is the cause
                problems.append(f"{group}={cfg[group].get('name')}: {e.__cause__ or e}")
    policy = built.get("freeze")
    lora = OmegaConf.select(cfg, "model.lora", default=None)
    if policy is not None and lora and not policy.trainable(LORA_PARAMETER):
        problems.append(
            f"freeze={policy.name}: model.lora adds LoRA adapters but the rules keep them frozen "
            "(add {pattern: 'lora_', trainable: true})"
        )
    return problems


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
    if not problems:  # a key its component does not take would be reported twice
        problems += _component_problems(cfg)
    if cfg.get("trainer") is not None:
        problems += _trainer_problems(cfg.trainer)
    if cfg.get("data") is not None:
        problems += _template_problems(cfg.data)
    if cfg.get("eval_after_fit") is not None and not (cfg.get("callbacks") or {}).get(
        "model_checkpoint"
    ):
        problems.append(
            "eval_after_fit: evaluates the best-val checkpoint, but callbacks.model_checkpoint "
            "is off"
        )
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not _is_checkpoint_source(str(ckpt_path)):
        problems.append(f"ckpt_path={ckpt_path}: no such checkpoint file or folder")
    if problems:
        raise ConfigError("\n".join(problems))
