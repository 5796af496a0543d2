"""The memory model of a training setup: parameter, optimiser-state and activation bytes per
GPU, before anything is allocated."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any
from unittest import mock

import torch
from omegaconf import DictConfig
from torch import nn

from sa2va.training.freeze import format_parameter_table, module_family, parameter_table
from sa2va.utils import to_plain

log = logging.getLogger(__name__)

GIB = 2**30
# families of sa2va.training.freeze.MODULE_FAMILIES in forward order: a family saves activations
# when it or any family before it trains
FORWARD_ORDER = ["vision", "mm_connector", "llm", "projector", "temporal", "sam2_decoder"]


# ------------------------------------------------------------------ the model on meta


def build_meta_model(model_cfg: Mapping[str, Any], freeze_cfg: Mapping[str, Any]) -> nn.Module:
    """The configured model on the meta device with its freeze policy (LoRA included).

    ``model.mllm.path`` is dropped so the architecture comes from ``model.mllm.config``
    alone. SAM 2's Hiera turns a ``torch.linspace`` into Python floats (drop-path rates)
    while it is built, which meta tensors cannot do, so that one call stays on the CPU.
    """
    from hydra.utils import instantiate

    model_cfg = dict(to_plain(model_cfg))
    if not model_cfg["mllm"].get("config"):
        raise ValueError(
            f"model={model_cfg.get('name')}: the planner needs model.mllm.config (the "
            "architecture numbers); this model only names a folder"
        )
    model_cfg["mllm"] = {**model_cfg["mllm"], "path": None}
    linspace = torch.linspace

    def cpu_linspace(*args: Any, **kwargs: Any) -> torch.Tensor:
        return linspace(*args, **{"device": "cpu", **kwargs})

    with torch.device("meta"), mock.patch.object(torch, "linspace", cpu_linspace):
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


# --------------------------------------------------------------------- model states


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


# ---------------------------------------------------------------------- activations


@dataclass
class Workload:
    """One micro-batch as the model sees it."""

    micro_batch: int
    frames: int  # frames per sample through SAM 2 (data.clip_len)
    llm_frames: int  # of them shown to the MLLM (model.mllm_frames)
    tiles_per_frame: int  # InternVL tiles (+ thumbnail when tiling)
    prompts: int  # objects ([SEG] tokens) per sample
    text_tokens: int  # chat template, prompt and answer tokens per object

    def llm_tokens(self, image_seq_length: int) -> int:
        """LLM sequence length: <img> + tokens per tile + </img> per frame, then the text."""
        image = self.llm_frames * (image_seq_length * self.tiles_per_frame + 2)
        return image + self.prompts * self.text_tokens


def norm_bytes(hidden: int, act: int, rms: bool) -> int:
    """Saved per token by one pre-norm and its output. RMSNorm (HF) upcasts to fp32 and
    keeps that input and the normalised value; LayerNorm keeps its input and two fp32
    statistics. The output is kept by the next linear layer."""
    return 4 * hidden + 2 * act * hidden + 4 if rms else 2 * act * hidden + 8


def layer_bytes(
    hidden: int,
    intermediate: int,
    kv_dim: int,
    heads: int,
    act: int,
    gated: bool,
    rms: bool,
    extra: int = 0,
) -> int:
    """Bytes saved for backward per token by one pre-norm transformer layer (``act`` bytes
    per activation): two norms (:func:`norm_bytes`); attention keeps q, k, v, its output
    and an fp32 log-sum-exp per head — flash / memory-efficient SDPA as on a GPU, so no
    seq x seq matrix; a SwiGLU MLP keeps gate, up, act(gate) and their product (4 x
    intermediate), a GELU MLP its hidden layer before and after the activation (2 x).
    ``extra``: model-specific terms (layer scale, q/k norms, LoRA)."""
    attention = act * (2 * hidden + 2 * kv_dim) + 4 * heads
    mlp = act * intermediate * (4 if gated else 2)
    return 2 * norm_bytes(hidden, act, rms) + attention + mlp + extra


# what feeds each LoRA target of an HF decoder layer (q/k/v share the normalised input)
LORA_INPUTS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_mid",
}


@dataclass(frozen=True)
class LoraTarget:
    """One peft LoRA-wrapped linear layer of an LLM layer."""

    name: str  # the wrapped module's attribute name (q_proj, ...)
    in_features: int
    rank: int
    dropout: float


def lora_targets(model: nn.Module, layer: int = 0) -> list[LoraTarget]:
    """The LoRA-wrapped linear layers of one LLM layer (peft names them ``lora_A``/``B``)."""
    targets = []
    for name, module in model.language_model.named_modules():
        if f"layers.{layer}." not in f"{name}." or not hasattr(module, "lora_A"):
            continue
        for adapter, lora_a in module.lora_A.items():
            dropout = module.lora_dropout[adapter]
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            targets.append(
                LoraTarget(name.rsplit(".", 1)[-1], lora_a.in_features, lora_a.out_features, p)
            )
    return targets


def llm_layer_bytes(
    text_config: Any,
    act: int,
    weights_train: bool = True,
    lora: tuple[LoraTarget, ...] | list[LoraTarget] = (),
    mask_bytes: int = 1,
) -> int:
    """Bytes one HF decoder layer (RMSNorm, SwiGLU) saves per token; the RoPE tables are
    shared by all layers and left out.

    Trainable weights: :func:`layer_bytes`. Frozen weights on the gradient path save only
    what the input's gradient needs: each RMSNorm its fp32 input and statistic (4h + 4),
    attention q, k, v, output and log-sum-exp, the MLP gate, up and act(gate) (3 x
    intermediate); no linear layer keeps its input. LoRA adds per target the rank-r output
    feeding ``lora_B``, and the input feeding ``lora_A``: a dropout copy with its mask
    (``mask_bytes``: 1 for the GPU's fused dropout) when dropout > 0, else the layer's own
    input where nothing else keeps it (once per shared input).
    """
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    hidden, inter = text_config.hidden_size, text_config.intermediate_size
    kv_dim = text_config.num_key_value_heads * head_dim
    if weights_train:
        total = layer_bytes(hidden, inter, kv_dim, heads, act, gated=True, rms=True)
        kept = set(LORA_INPUTS.values())
    else:
        attention = act * (2 * hidden + 2 * kv_dim) + 4 * heads
        total = 2 * (4 * hidden + 4) + attention + 3 * act * inter
        kept = {"attn_out"}  # the attention output, kept by attention itself
    for target in lora:
        total += act * target.rank
        if target.dropout > 0:
            total += (act + mask_bytes) * target.in_features
        elif (source := LORA_INPUTS.get(target.name, target.name)) not in kept:
            total += act * target.in_features
            kept.add(source)
    return total


def vit_layer_bytes(vision_config: Any, act: int) -> int:
    """:func:`layer_bytes` for an InternViT layer (GELU MLP; layer scale keeps the attention
    and MLP outputs; the 6B's q/k RMSNorms keep fp32 q and k, their statistics and the
    normalised values)."""
    hidden = vision_config.hidden_size
    qk_norm = 2 * (4 * hidden + act * hidden + 4) if vision_config.use_qk_norm else 0
    return layer_bytes(
        hidden,
        vision_config.intermediate_size,
        hidden,
        vision_config.num_attention_heads,
        act,
        gated=False,
        rms=vision_config.norm_type == "rms_norm",
        extra=2 * act * hidden + qk_norm,
    )


def hiera_bytes(trunk: nn.Module, image_size: int, act: int) -> int:
    """Per image, what SAM 2's Hiera trunk saves, block by block (exact against CPU traces).

    A block windows its tokens (padding the side up to a multiple of the window), so its
    attention tensors (the partitioned input, fused qkv, fp32 log-sum-exp per head, output)
    count padded tokens, the norms (input + 2 fp32 statistics) and GELU MLP (input, hidden
    before and after GELU) real ones. A stage's first block also projects its normalised
    input for the shortcut and max-pools it and the queries by the q-stride; pooling keeps
    its input and int64 indices. Plus the patch embedding's input image.
    """
    total, side = 3 * image_size**2 * act, image_size // 4
    for block in trunk.blocks:
        d_in, d_out, window = block.dim, block.dim_out, block.window_size
        pool = 4 if block.pool is not None else 1
        padded = (-(-side // window) * window if window else side) ** 2
        t_in, t_out, p_out = side**2, side**2 // pool, padded // pool
        hidden = block.mlp.layers[0].out_features
        total += (act * d_in + 8) * t_in + act * d_in * padded  # norm1; qkv input
        if d_in != d_out:  # shortcut: proj input (unless windowing is a view), pooled output
            total += act * d_in * t_in if window and side != window else 0
            total += act * d_out * t_in + (8 * d_out * t_out if pool > 1 else 0)
        total += 3 * act * d_out * padded + 4 * block.attn.num_heads * p_out
        if pool > 1:  # pooled queries: indices, then the copy attention keeps
            total += 8 * d_out * p_out + act * d_out * p_out
        total += act * d_out * p_out  # attention output (the projection's input)
        total += (act * d_out + 8) * t_out + act * d_out * t_out + 2 * act * hidden * t_out
        side = side // 2 if pool > 1 else side
    return total


def sam2_decoder_elements(sam2: nn.Module) -> int:
    """Elements SAM 2's prompt encoder + mask decoder save for one [SEG] prompt on one
    frame, traced on a CPU copy of those two small modules (uninitialised: only shapes
    matter) fed with zero features; the meta device cannot tell views from copies."""
    import copy
    from types import SimpleNamespace

    from sa2va.model.sam2 import ImageFeatures, decode_masks

    heads = SimpleNamespace(
        sam_prompt_encoder=copy.deepcopy(sam2.sam_prompt_encoder).to_empty(device="cpu"),
        sam_mask_decoder=copy.deepcopy(sam2.sam_mask_decoder).to_empty(device="cpu"),
    )
    size, dim = sam2.image_size, sam2.sam_prompt_encoder.embed_dim
    features = ImageFeatures(
        torch.zeros(1, dim, size // 16, size // 16, requires_grad=True),
        [torch.zeros(1, dim // 8, size // 4, size // 4, requires_grad=True),
         torch.zeros(1, dim // 4, size // 8, size // 8, requires_grad=True)],
    )  # fmt: skip
    weights = {
        p.untyped_storage().data_ptr()
        for module in vars(heads).values()
        for p in module.parameters()
    }
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decode_masks(heads, features, torch.zeros(1, dim, requires_grad=True), True)
    return sum(saved.values())


@dataclass
class Activations:
    """Bytes of one micro-batch's activations on one GPU, per module family."""

    vision: int = 0
    mm_connector: int = 0
    llm: int = 0
    logits: int = 0
    sam2_encoder: int = 0
    sam2_decoder: int = 0
    mask_loss: int = 0

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


def activation_bytes(
    model: nn.Module,
    stats: ParamStats,
    model_cfg: Mapping[str, Any],
    work: Workload,
    act: int,
    checkpointing: bool,
    decoder_elements: int,
) -> Activations:
    """Activations of one micro-batch on one GPU.

    A family keeps activations when backward must pass through it: it trains, or something
    before it in the forward order does (:data:`FORWARD_ORDER`). The LLM keeps tokens x
    :func:`llm_layer_bytes` for each layer on the gradient path — or, with gradient
    checkpointing, each layer's input (hidden x bytes) plus one layer recomputed in
    backward; the LM loss peaks at tokens x vocab x (act + 8) (logits, their fp32 copy and
    fp32 log-softmax). A trainable vision tower (tiles x (patches + 1) tokens,
    :func:`vit_layer_bytes`) is counted alike. SAM 2: Hiera per frame (:func:`hiera_bytes`)
    when its encoder trains; the mask decoder per prompt and frame (``decoder_elements``,
    from :func:`sam2_decoder_elements`) and four fp32 mask-sized maps per mask for the losses.
    """
    from sa2va.model.mllm import image_seq_length

    families = set(stats.trainable_families)
    upstream = [f for f in FORWARD_ORDER if f in families]
    first = FORWARD_ORDER.index(upstream[0]) if upstream else len(FORWARD_ORDER)

    def saves(family: str) -> bool:
        return FORWARD_ORDER.index(family) >= first

    def stack(tokens: int, per_layer: list[int], hidden: int) -> int:
        if checkpointing and per_layer:
            return tokens * (len(per_layer) * hidden * act + max(per_layer))
        return tokens * sum(per_layer)

    config = model.mllm.config
    text, vision = config.text_config, config.vision_config
    tokens = work.micro_batch * work.llm_tokens(image_seq_length(config))
    out = Activations()
    tiles = work.micro_batch * work.llm_frames * work.tiles_per_frame
    if saves("vision"):
        patches = (vision.image_size[0] // vision.patch_size[0]) ** 2 + 1
        per_layer = [vit_layer_bytes(vision, act)] * vision.num_hidden_layers
        out.vision = stack(tiles * patches, per_layer, vision.hidden_size)
    if saves("mm_connector"):
        image_tokens = tiles * image_seq_length(config)
        shuffled = vision.hidden_size * 4  # pixel shuffle 0.5: 4 patches per token
        out.mm_connector = image_tokens * (2 * act * shuffled + 8 + 2 * act * text.hidden_size)
    if saves("llm"):
        needs_grad = "vision" in upstream or "mm_connector" in upstream
        out.llm = stack(tokens, _llm_layer_list(model, text, act, needs_grad), text.hidden_size)
        out.logits = tokens * text.vocab_size * (act + 8)
    images = work.micro_batch * work.frames
    if "sam2_encoder" in families:
        trunk = model.sam2.image_encoder.trunk
        out.sam2_encoder = images * hiera_bytes(trunk, model.sam2.image_size, act)
    if saves("sam2_decoder") or "sam2_encoder" in families:
        masks = images * work.prompts
        out.sam2_decoder = masks * decoder_elements * act
        mask_size = model_cfg.get("mask_size") or model.sam2.image_size
        out.mask_loss = masks * 4 * 4 * mask_size**2
    return out


def _llm_layer_list(model: nn.Module, text: Any, act: int, input_needs_grad: bool) -> list[int]:
    """Bytes per token of each LLM layer backward passes through: all of them when the
    input needs a gradient (trainable embeddings or vision side), else those from the first
    layer that trains (LoRA or its own weights)."""
    weights, adapted = set(), set()
    for name, param in model.language_model.named_parameters():
        if not param.requires_grad:
            continue
        input_needs_grad |= "embed_tokens" in name
        if match := re.search(r"layers\.(\d+)\.", name):
            (adapted if "lora_" in name else weights).add(int(match.group(1)))
    layers = text.num_hidden_layers
    first = 0 if input_needs_grad else min(weights | adapted, default=layers)
    targets = lora_targets(model)
    return [
        llm_layer_bytes(text, act, j in weights, targets if j in adapted else ())
        for j in range(first, layers)
    ]


# ----------------------------------------------------------------------------- plan


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


def _world(trainer: Mapping[str, Any]) -> tuple[int, int]:
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, list | tuple):
        devices = len(devices)
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"trainer.devices={devices!r}: the planner needs a number of GPUs")
    return devices, nodes


def plan(cfg: DictConfig) -> dict[str, Any]:
    """Everything the CLI prints, as plain data (also written to ``plan.json``)."""
    from sa2va.model.mllm import image_seq_length

    pcfg, trainer = cfg.plan, cfg.trainer
    model = build_meta_model(cfg.model, cfg.freeze)
    config = model.mllm.config
    stats = ParamStats.of(model)
    per_node, nodes = _world(trainer)
    world = per_node * nodes
    precision = str(trainer.get("precision", "32-true"))
    act = 2 if "16" in precision else 4
    micro = int(pcfg.micro_batch or cfg.data.batch_size)
    frames = int(pcfg.frames or cfg.data.get("clip_len", 1))
    max_tiles = int(cfg.model.mllm.get("max_tiles", 1))
    work = Workload(
        micro_batch=micro,
        frames=frames,
        llm_frames=min(frames, int(cfg.model.get("mllm_frames", 5))),
        # a single image is tiled (at most max_tiles + a thumbnail); a video frame is 1 tile
        tiles_per_frame=max_tiles + 1 if max_tiles > 1 and frames == 1 else 1,
        prompts=int(pcfg.prompts),
        text_tokens=int(pcfg.text_tokens),
    )
    strategy = trainer.get("strategy")
    buckets = 400_000_000
    if isinstance(strategy, Mapping):
        buckets = int(strategy.get("allgather_bucket_size", 2e8)) + int(
            strategy.get("reduce_bucket_size", 2e8)
        )
    model_cfg = to_plain(cfg.model)
    checkpointing = bool(cfg.model.get("gradient_checkpointing", False))
    overhead = float(pcfg.overhead_gb) * GIB

    decoder = sam2_decoder_elements(model.sam2)

    def activations(batch: int, ckpt: bool) -> Activations:
        batch_work = replace(work, micro_batch=batch)
        return activation_bytes(model, stats, model_cfg, batch_work, act, ckpt, decoder)

    selected = selected_setup(trainer)
    rows = ROWS if selected in ROWS else [*ROWS, selected]
    acts = {ckpt: activations(micro, ckpt) for ckpt in (False, True)}
    table = []
    for setup in rows:
        states = model_state_bytes(stats, setup, precision, world, per_node, buckets)
        fixed = states.params + states.grads + states.optimizer + states.working + overhead
        table.append(
            {
                "setup": setup.name,
                "selected": setup == selected,
                **asdict(states),
                "activations": acts[checkpointing].total,
                "gpu_total": fixed + acts[checkpointing].total,
                "gpu_total_other_ckpt": fixed + acts[not checkpointing].total,
            }
        )
    states = model_state_bytes(stats, selected, precision, world, per_node, buckets)
    fixed = states.params + states.grads + states.optimizer + states.working + overhead
    budget = float(pcfg.gpu_memory_gb) * GIB
    suggestion = suggest_batches(
        lambda batch, ckpt: fixed + activations(batch, ckpt).total,
        budget,
        int(pcfg.effective_batch),
        world,
        checkpointing,
    )
    return {
        "model": cfg.model.get("name"),
        "freeze": cfg.freeze.get("name"),
        "precision": precision,
        "gpus": {"per_node": per_node, "nodes": nodes, "world": world},
        "gpu_memory_gb": float(pcfg.gpu_memory_gb),
        "gradient_checkpointing": checkpointing,
        "overhead_gb": float(pcfg.overhead_gb),
        "parameters": parameter_table(model),
        "stats": asdict(stats),
        "workload": {**asdict(work), "llm_tokens": work.llm_tokens(image_seq_length(config))},
        "activations": {str(k): asdict(v) for k, v in acts.items()},
        "rows": table,
        "cpu_at_startup": per_node * stats.total_bytes,
        "fits": fixed + acts[checkpointing].total <= budget,
        "suggestion": suggestion,
        "deepspeed": deepspeed_estimate(stats, per_node, nodes),
    }


def suggest_batches(
    total_for: Any, budget: float, effective: int, world: int, checkpointing: bool
) -> dict[str, Any]:
    """The largest micro-batch (a power of two) that fits with accumulation making up
    ``effective`` samples per optimiser step; gradient checkpointing if nothing fits without."""
    for ckpt in dict.fromkeys((checkpointing, True)):
        options = [m for m in (32, 16, 8, 4, 2, 1) if effective % (m * world) == 0]
        for micro in options:
            if total_for(micro, ckpt) <= budget:
                return {
                    "micro_batch": micro,
                    "accumulate_grad_batches": effective // (micro * world),
                    "gradient_checkpointing": ckpt,
                    "gpu_total": total_for(micro, ckpt),
                }
    return {"micro_batch": None, "reason": f"nothing fits {budget / GIB:.0f} GiB per GPU"}


def format_plan(result: Mapping[str, Any]) -> str:
    """The tables the CLI prints."""

    def gib(value: float) -> str:
        return f"{value / GIB:8.2f}"

    gpus = result["gpus"]
    work = result["workload"]
    ckpt = "on" if result["gradient_checkpointing"] else "off"
    lines = [
        f"model={result['model']} freeze={result['freeze']} precision={result['precision']} "
        f"GPUs={gpus['per_node']}x{gpus['nodes']} node(s)",
        "",
        format_parameter_table(result["parameters"]),
        "",
        f"micro-batch {work['micro_batch']}: {work['frames']} frame(s) per sample "
        f"({work['llm_frames']} to the MLLM, {work['tiles_per_frame']} tile(s) each), "
        f"{work['prompts']} object(s), {work['llm_tokens']} LLM tokens per sample",
        "activations per GPU (GiB), gradient checkpointing off / on:",
    ]
    off, on = result["activations"]["False"], result["activations"]["True"]
    for family in off:
        lines.append(f"  {family:<14}{gib(off[family])} /{gib(on[family])}")
    lines += [
        "",
        f"per GPU (GiB), gradient checkpointing {ckpt}; CPU per node (GiB):",
        f"{'setup':<30}{'params':>8}{'grads':>8}{'optim':>8}{'working':>8}"
        f"{'activ':>8}{'total':>8}{'other':>8}{'CPU':>8}",
    ]
    for row in result["rows"]:
        mark = "*" if row["selected"] else " "
        lines.append(
            f"{mark}{row['setup']:<29}{gib(row['params'])}{gib(row['grads'])}"
            f"{gib(row['optimizer'])}{gib(row['working'])}{gib(row['activations'])}"
            f"{gib(row['gpu_total'])}{gib(row['gpu_total_other_ckpt'])}{gib(row['cpu'])}"
        )
    other = "off" if result["gradient_checkpointing"] else "on"
    lines.append(
        f"(* = trainer config; other = total with gradient checkpointing {other}; totals "
        f"include {result['overhead_gb']:g} GiB for the CUDA context and fragmentation)"
    )
    lines += ["", "DeepSpeed's estimate (counts every parameter as trainable):"]
    lines += ["  " + line for line in result["deepspeed"]["printed"].rstrip().splitlines()]
    rows = {row["setup"]: row for row in result["rows"]}
    lines.append("model states per GPU (params + grads + optimizer + working), DeepSpeed vs here:")
    for name, theirs in result["deepspeed"]["rows"].items():
        ours = rows[name]
        states = ours["params"] + ours["grads"] + ours["optimizer"] + ours["working"]
        lines.append(f"  {name:<30}{gib(theirs['gpu'])} vs{gib(states)} GiB")
    lines.append(
        f"CPU at start-up: every rank builds the whole model before sharding, "
        f"{gib(result['cpu_at_startup']).strip()} GiB per node"
    )
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines += ["", f"selected setup {verdict} in {result['gpu_memory_gb']:g} GiB per GPU."]
    suggestion = result["suggestion"]
    if suggestion["micro_batch"] is None:
        lines.append(f"suggestion: {suggestion['reason']}; try offload or more GPUs")
    else:
        lines.append(
            f"suggestion: data.batch_size={suggestion['micro_batch']} "
            f"trainer.accumulate_grad_batches={suggestion['accumulate_grad_batches']} "
            f"model.gradient_checkpointing={str(suggestion['gradient_checkpointing']).lower()}"
            f" ({gib(suggestion['gpu_total']).strip()} GiB per GPU)"
        )
    return "\n".join(lines)
