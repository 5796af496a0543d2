"""Parameters and model states of a training setup, before anything is allocated: the
configured model built on the meta device, its parameter counts, and the weight, gradient and
optimiser-state bytes per GPU under each sharding setup (DeepSpeed ZeRO, DDP, FSDP)."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from sa2va.model.releases import on_meta
from sa2va.training.freeze import module_family
from sa2va.utils import to_plain


def build_meta_model(model_cfg: Mapping[str, Any], freeze_cfg: Mapping[str, Any]) -> nn.Module:
    """The configured model (its LoRA adapters included) on the meta device, frozen by its policy.

    ``model.mllm.path`` is dropped so the architecture comes from ``model.mllm.config``
    alone (:func:`sa2va.model.releases.on_meta` builds it without memory).
    """
    from hydra.utils import instantiate

    model_cfg = dict(to_plain(model_cfg))
    if not model_cfg["mllm"].get("config"):
        raise ValueError(
            f"model={model_cfg.get('name')}: the planner needs model.mllm.config (the "
            "architecture numbers); this model only names a folder"
        )
    model_cfg["mllm"] = {**model_cfg["mllm"], "path": None}
    with on_meta():
        model = instantiate(model_cfg, load_pretrained=False, _convert_="all")
        instantiate(to_plain(freeze_cfg)).apply(model)
    return model


@dataclass
class ParamStats:
    """Parameter counts (each shared tensor once) and bytes in the dtypes as built."""

    total: int
    trainable: int
    trainable_tensors: int
    total_bytes: int
    trainable_bytes: int
    largest_layer: int  # parameters of the largest single module (DeepSpeed's definition)
    trainable_families: list[str]

    @classmethod
    def of(cls, model: nn.Module) -> ParamStats:
        params = list(model.named_parameters())
        trainable = [p for _, p in params if p.requires_grad]
        largest = max(
            (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
            default=0,
        )
        families = {module_family(n) for n, p in params if p.requires_grad}
        if "lora" in families:  # LoRA weights live in the LLM
            families.add("llm")
        return cls(
            total=sum(p.numel() for _, p in params),
            trainable=sum(p.numel() for p in trainable),
            trainable_tensors=len(trainable),
            total_bytes=sum(p.numel() * p.element_size() for _, p in params),
            trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
            largest_layer=largest,
            trainable_families=sorted(families),
        )


@dataclass(frozen=True)
class Setup:
    """How model states are kept: ``deepspeed`` (ZeRO stage, offload) or ``torch`` (DDP,
    or FSDP with its sharding mapped onto the same stages)."""

    name: str
    engine: str  # "deepspeed" | "torch"
    stage: int = 0  # 1: optimizer states sharded, 2: + gradients, 3: + parameters
    offload_optimizer: bool = False
    offload_params: bool = False


ROWS = [
    Setup("DDP (torch AdamW)", "torch", 0),
    Setup("ZeRO-0", "deepspeed", 0),
    Setup("ZeRO-2", "deepspeed", 2),
    Setup("ZeRO-2 + offload opt", "deepspeed", 2, offload_optimizer=True),
    Setup("ZeRO-3", "deepspeed", 3),
    Setup("ZeRO-3 + offload opt", "deepspeed", 3, offload_optimizer=True),
    Setup("ZeRO-3 + offload opt+params", "deepspeed", 3, True, True),
]
FSDP_STAGES = {"NO_SHARD": 0, "SHARD_GRAD_OP": 2, "FULL_SHARD": 3, "HYBRID_SHARD": 3}


def selected_setup(trainer: Mapping[str, Any]) -> Setup:
    """The row the trainer config asks for (Lightning strategy object or name)."""
    strategy = trainer.get("strategy")
    target = str(strategy.get("_target_", "")) if isinstance(strategy, Mapping) else ""
    name = str(strategy or "") if not isinstance(strategy, Mapping) else ""
    if "DeepSpeed" in target or name.startswith("deepspeed"):
        digits = re.findall(r"\d", name)
        stage = int(strategy.get("stage", 2)) if target else int(digits[0]) if digits else 2
        opt = bool(strategy.get("offload_optimizer")) if target else "offload" in name
        params = bool(strategy.get("offload_parameters")) if target else "offload" in name
        setup = Setup("", "deepspeed", stage, opt, params and stage == 3)
    elif "FSDP" in target or name == "fsdp":
        sharding = strategy.get("sharding_strategy", "FULL_SHARD") if target else "FULL_SHARD"
        offload = bool(strategy.get("cpu_offload")) if target else False
        setup = Setup("", "torch", FSDP_STAGES[str(sharding)], offload, offload)
    else:
        setup = Setup("", "torch", 0)
    same = next((r for r in ROWS if replace(r, name="") == setup), None)
    return same or replace(setup, name=f"{'FSDP' if target else 'selected'} stage {setup.stage}")


@dataclass
class StateBytes:
    """Per GPU, except ``cpu``: the offloaded states held in one node's RAM."""

    params: int
    grads: int
    optimizer: int
    working: int  # gathered ZeRO-3/FSDP layer + communication buckets
    cpu: int


def model_state_bytes(
    stats: ParamStats,
    setup: Setup,
    precision: str,
    world: int,
    per_node: int,
    buckets: int = 400_000_000,
) -> StateBytes:
    """Weights, gradients and AdamW states per GPU.

    DeepSpeed with 16-bit precision keeps every weight in 2 bytes (frozen ones too) and, for
    trainable weights only, a 2-byte gradient and 12 bytes of fp32 optimizer state (master
    copy + two moments): the ZeRO paper's 2 + 2 + 12. In fp32 it is 4 + 4 + 8. torch (DDP,
    FSDP) keeps weights in the dtype they were built in (``*-true`` precisions convert
    them), gradients in the same dtype and AdamW's two moments likewise, plus a 4-byte
    ``step`` per trainable tensor. Stage >= 1 divides optimizer states by ``world``, >= 2
    gradients, 3 weights; offload moves the optimizer states (with DeepSpeed also the fp32
    gradients) or the weights to the CPU. ``buckets`` (elements) are DeepSpeed's allgather +
    reduce buckets.
    """
    half = "16" in precision
    if setup.engine == "deepspeed":
        w, g, o = (2, 2, 12) if half else (4, 4, 8)
        params, grads, optim = w * stats.total, g * stats.trainable, o * stats.trainable
        offloaded_grads = 4 * stats.trainable  # fp32 gradients live beside the states
        working_unit = (w + g) * stats.largest_layer
        bucket_bytes = buckets * (2 if half else 4) if setup.stage else 0
    else:
        size = 2 if precision.endswith("-true") and half else None
        params = size * stats.total if size else stats.total_bytes
        grads = size * stats.trainable if size else stats.trainable_bytes
        optim = 2 * grads + 4 * stats.trainable_tensors
        offloaded_grads = grads
        working_unit = 2 * params // max(stats.total, 1) * stats.largest_layer
        bucket_bytes = grads if world > 1 and setup.stage == 0 else 0  # DDP's bucket copy
    shard = {"optimizer": 1, "grads": 1, "params": 1}
    if setup.stage >= 1:
        shard["optimizer"] = world
    if setup.stage >= 2:
        shard["grads"] = world
    if setup.stage == 3:
        shard["params"] = world
    gpu_params = params // shard["params"]
    gpu_grads = grads // shard["grads"]
    gpu_optim = optim // shard["optimizer"]
    cpu = 0
    if setup.offload_optimizer:
        cpu += (optim + offloaded_grads) // shard["optimizer"] * per_node
        gpu_optim, gpu_grads = 0, 0
    if setup.offload_params:
        cpu += gpu_params * per_node
        gpu_params = 0
    working = bucket_bytes + (working_unit if setup.stage == 3 else 0)
    return StateBytes(gpu_params, gpu_grads, gpu_optim, working, cpu)


def deepspeed_estimate(stats: ParamStats, per_node: int, nodes: int) -> dict[str, Any]:
    """DeepSpeed's ZeRO-3 model-state estimate (all parameters counted as trainable): its
    printed table and the GPU/CPU numbers of its three option rows."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        estimate_zero3_model_states_mem_needs_all_cold(
            stats.total, stats.largest_layer, num_gpus_per_node=per_node, num_nodes=nodes
        )
    rows = {}
    for name, offload_opt, offload_params in (
        ("ZeRO-3", False, False),
        ("ZeRO-3 + offload opt", True, False),
        ("ZeRO-3 + offload opt+params", True, True),
    ):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            stats.total,
            stats.largest_layer,
            num_gpus_per_node=per_node,
            num_nodes=nodes,
            cpu_offload=offload_opt,
            cpu_offload_params=offload_params,
            zero_init=True,
        )
        rows[name] = {"gpu": gpu, "cpu": cpu}
    return {"printed": printed.getvalue(), "rows": rows}
