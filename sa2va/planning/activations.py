"""Activation bytes of one micro-batch per GPU, module family by module family: what
autograd saves for backward in the LLM, the vision tower, the projector and SAM 2 (checked
against CPU traces in tests/planning)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from sa2va.planning.states import ParamStats

# families of sa2va.training.freeze.MODULE_FAMILIES in forward order: a family saves activations
# when it or any family before it trains
FORWARD_ORDER = ["vision", "mm_connector", "llm", "projector", "temporal", "sam2_decoder"]


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
