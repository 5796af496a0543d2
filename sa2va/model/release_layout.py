"""This project's weights and config in the layout of the official Sa2VA releases.

The inverse of :func:`sa2va.model.checkpoints.official_to_sa2va`: a state dict in this
project's module names (HF-native ``InternVLForConditionalGeneration`` + ``sam2`` package +
``text_hidden_fcs``) becomes

* the **training (xtuner) layout** of the official code (``mllm.model.vision_model.*``,
  ``mllm.model.mlp1.*``, ``mllm.model.language_model.*``, ``grounding_encoder.sam2_model.*``,
  ``text_hidden_fcs.*``; InternViT's fused ``attn.qkv``, InternLM2's fused ``wqkv``), and
* the **HF release layout** of ``ByteDance/Sa2VA-*`` (official ``tools/convert_to_hf.py``
  drops ``mllm.model.`` and renames SAM 2's ``.gamma`` to ``.g_weight``),

plus the release's ``config.json`` (the fields of the official ``Sa2VAChatConfig``), so a
model fine-tuned here runs wherever the official Sa2VA runs. Every key must have an official
name: an unknown key is an error, never silently passed through.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sa2va.model.checkpoints import INTERNLM2_NAMES, MLP1_NAMES, VISION_NAMES, rename_by_table
from sa2va.model.mllm import default_template

# the dynamic tiling every official Sa2VA release config sets (InternVL's defaults)
RELEASE_TILING = {
    "dynamic_image_size": True,
    "use_thumbnail": True,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 12,
    "ps_version": "v2",
    "pad2square": False,
}
AUTO_MAP = {
    "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
    "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
    "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
}
INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}

# (our prefix, official training-layout prefix)
VISION = ("mllm.model.vision_tower.", "mllm.model.vision_model.")
PROJECTOR = ("mllm.model.multi_modal_projector.", "mllm.model.mlp1.")
TEXT = ("mllm.model.language_model.", "mllm.model.language_model.model.")
SAM2 = ("sam2.", "grounding_encoder.sam2_model.")
FCS = ("text_hidden_fcs.", "text_hidden_fcs.")

VISION_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
TEXT_QKV = re.compile(r"^layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


class NoOfficialNameError(KeyError):
    """A key of this project's model that has no counterpart in the official layout."""


def _official_name(rest: str, table: Sequence[tuple[str, str]], where: str) -> str:
    name = rename_by_table(rest, table, to_official=True)
    if name is None:
        raise NoOfficialNameError(f"{where}{rest}: no official name for this key")
    return name


def fuse_internlm2_wqkv(q: Tensor, k: Tensor, v: Tensor, num_kv_heads: int) -> Tensor:
    """InternLM2's fused ``wqkv`` rows, grouped per KV head: for each of the
    ``num_kv_heads`` groups, its query heads, then its key head, then its value head (the
    inverse of :func:`sa2va.model.checkpoints.split_internlm2_wqkv`)."""
    parts = zip(q.chunk(num_kv_heads), k.chunk(num_kv_heads), v.chunk(num_kv_heads), strict=True)
    return torch.cat([row for group in parts for row in group])


def _qkv_parts(state: Mapping[str, Tensor], q_key: str) -> list[Tensor]:
    keys = [q_key.replace("q_proj", f"{part}_proj") for part in "qkv"]
    missing = [key for key in keys if key not in state]
    if missing:
        raise NoOfficialNameError(f"{q_key}: cannot fuse q/k/v, {missing} absent")
    return [state[key] for key in keys]


def _vision(rest: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    our, official = VISION
    if match := VISION_QKV.match(rest):
        layer, part, kind = match.groups()
        if part != "q":
            return {}  # folded into the q entry
        fused = torch.cat(_qkv_parts(state, our + rest))
        return {f"{official}encoder.layers.{layer}.attn.qkv.{kind}": fused}
    return {official + _official_name(rest, VISION_NAMES, our): state[our + rest]}


def _text(rest: str, state: Mapping[str, Tensor], internlm2: bool, kv: int) -> dict[str, Tensor]:
    our, official = TEXT
    if not internlm2:
        return {official + rest: state[our + rest]}
    if match := TEXT_QKV.match(rest):
        layer, part, kind = match.groups()
        if kind == "bias":
            raise NoOfficialNameError(f"{our}{rest}: InternLM2's wqkv has no bias")
        if part != "q":
            return {}
        fused = fuse_internlm2_wqkv(*_qkv_parts(state, our + rest), num_kv_heads=kv)
        return {f"{official}layers.{layer}.attention.wqkv.weight": fused}
    return {official + _official_name(rest, INTERNLM2_NAMES, our): state[our + rest]}


def _projector(rest: str, tensor: Tensor) -> dict[str, Tensor]:
    name, _, param = rest.partition(".")
    index = {ours: official for official, ours in MLP1_NAMES.items()}.get(name)
    if index is None:
        raise NoOfficialNameError(f"{PROJECTOR[0]}{rest}: no official name for this key")
    return {f"{PROJECTOR[1]}{index}.{param}": tensor}


def sa2va_to_official(
    state: Mapping[str, Tensor], text_model_type: str, num_kv_heads: int
) -> dict[str, Tensor]:
    """This project's state dict -> the official training (xtuner ``.pth``) layout.

    ``text_model_type`` is the LLM family (``qwen2``: names kept; ``llama``: InternLM2
    names, q/k/v fused into ``wqkv`` per KV-head group). Tensors are not copied.
    """
    if any(".lora_" in k or ".base_model.model." in k for k in state):
        raise ValueError("state dict holds unmerged LoRA weights: merge them first")
    internlm2 = text_model_type == "llama"
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(VISION[0]):
            out.update(_vision(key.removeprefix(VISION[0]), state))
        elif key.startswith(PROJECTOR[0]):
            out.update(_projector(key.removeprefix(PROJECTOR[0]), tensor))
        elif key.startswith(TEXT[0]):
            out.update(_text(key.removeprefix(TEXT[0]), state, internlm2, num_kv_heads))
        elif key == "mllm.lm_head.weight":
            head = "output" if internlm2 else "lm_head"
            out[f"mllm.model.language_model.{head}.weight"] = tensor
        elif key.startswith((SAM2[0], FCS[0])):
            ours, official = SAM2 if key.startswith(SAM2[0]) else FCS
            out[official + key.removeprefix(ours)] = tensor
        else:
            raise NoOfficialNameError(f"{key}: no official name for this key")
    return out


def official_to_release(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Training layout -> HF release layout, as the official ``tools/convert_to_hf.py``
    renames: ``mllm.model.`` dropped, SAM 2's CXBlock ``.gamma`` -> ``.g_weight``."""
    out = {}
    for key, tensor in state.items():
        if key.startswith(SAM2[1]):
            key = re.sub(r"\.gamma$", ".g_weight", key)
        out[key.removeprefix("mllm.model.")] = tensor
    return out


def sa2va_to_release(
    state: Mapping[str, Tensor], text_model_type: str, num_kv_heads: int
) -> dict[str, Tensor]:
    """This project's state dict -> the HF release layout of ``ByteDance/Sa2VA-*``."""
    return official_to_release(sa2va_to_official(state, text_model_type, num_kv_heads))


# ------------------------------------------------------------------------ config.json


def _rope(text: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, InternLM2-style rope_scaling or None) of a transformers text config."""
    params = dict(getattr(text, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(text, "rope_theta", None))
    kind = params.get("rope_type", "default")
    scaling = None if kind == "default" else {"type": kind, "factor": params.get("factor")}
    return theta, scaling


def _vision_config(vision: Any) -> dict[str, Any]:
    """InternVisionConfig fields (official ``configuration_intern_vit.py``)."""
    size, patch = vision.image_size, vision.patch_size
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": vision.hidden_size,
        "num_hidden_layers": vision.num_hidden_layers,
        "num_attention_heads": vision.num_attention_heads,
        "intermediate_size": vision.intermediate_size,
        "qkv_bias": vision.attention_bias,
        "qk_normalization": vision.use_qk_norm,
        "norm_type": vision.norm_type,
        "layer_norm_eps": vision.layer_norm_eps,
        "hidden_act": vision.hidden_act,
        "image_size": size[0] if isinstance(size, list | tuple) else size,
        "patch_size": patch[0] if isinstance(patch, list | tuple) else patch,
        "num_channels": vision.num_channels,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "use_flash_attn": False,
    }


def _llm_config(text: Any) -> dict[str, Any]:
    """Qwen2Config (the text config's own fields) or InternLM2Config fields."""
    theta, scaling = _rope(text)
    if text.model_type == "qwen2":
        return {
            **text.to_dict(),
            "architectures": ["Qwen2ForCausalLM"],
            "rope_theta": theta,  # the field name transformers 4.x (the releases') reads
            "tie_word_embeddings": False,  # the release holds lm_head and embed_tokens
        }
    if text.model_type != "llama":
        raise ValueError(f"text model {text.model_type!r}: official Sa2VA has no such release")
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": INTERNLM2_AUTO_MAP,
        "model_type": "internlm2",
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": text.hidden_act,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "bias": bool(text.attention_bias),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id,
        "tie_word_embeddings": False,
        "attn_implementation": "eager",
    }


def release_config(
    mllm_config: Any, dtype: torch.dtype, template: str | None = None
) -> dict[str, Any]:
    """The release ``config.json`` (official ``Sa2VAChatConfig`` fields) of a model whose
    MLLM has the transformers ``InternVLConfig`` ``mllm_config``.

    ``template`` is InternVL's prompt template name; by default the text family's
    (``qwen_chat`` / ``internlm2_chat``, :func:`sa2va.model.mllm.default_template`).
    """
    text, vision = mllm_config.text_config, mllm_config.vision_config
    size = vision.image_size
    return {
        "architectures": ["Sa2VAChatModel"],
        "auto_map": AUTO_MAP,
        "model_type": "sa2va_chat",
        "template": template or default_template(text.model_type),
        "select_layer": mllm_config.vision_feature_layer,
        "downsample_ratio": mllm_config.downsample_ratio,
        "force_image_size": size[0] if isinstance(size, list | tuple) else size,
        **RELEASE_TILING,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "hidden_size": text.hidden_size,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "vision_config": _vision_config(vision),
        "llm_config": _llm_config(text),
    }


# ------------------------------------------------------------------------- weights


def _unshared(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors, each with its own storage (safetensors refuses shared ones:
    a tied ``lm_head`` is written as its own copy, as the release holds both)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def write_release_weights(
    state: Mapping[str, Tensor], folder: str | Path, max_shard_size: str | int = "5GB"
) -> list[str]:
    """Write ``state`` as HF safetensors: ``model.safetensors``, or shards
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` when larger
    than ``max_shard_size``. Returns the file names written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = _unshared(state)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, folder / filename, metadata={"format": "pt"})
    written = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        written.append("model.safetensors.index.json")
    return written
