"""Official InternVL / Sa2VA folders -> transformers' HF-native InternVL, without remote code.

Two folder kinds hold the original InternVL chat layout (`vision_model.*`, `mlp1.*`,
`language_model.*`) and a `config.json` written for remote code:

* `OpenGVLab/InternVL*` originals (`model_type: internvl_chat`);
* `ByteDance/Sa2VA-*` HF releases (`model_type: sa2va_chat`), which add `text_hidden_fcs.*`
  and SAM 2 (`grounding_encoder.sam2_model.*`).

Their config is converted to an `InternVLConfig` (InternViT `intern_vit_6b` vision; Qwen2,
InternLM2 (as Llama) or Phi-3 text; `sa2va.model.mllm` assembles the model); the tokenizer is
read with `trust_remote_code=False`, and the weights go through the explicit key map
`sa2va.model.checkpoints.official_to_sa2va` and a strict load. Sa2VA variants built on
Qwen2.5-VL / Qwen3-VL (no InternViT) are refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import (
    InternVLForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from sa2va.model.checkpoints import load_checked, official_to_sa2va

OFFICIAL_MODEL_TYPES = ("sa2va_chat", "internvl_chat")
INTERN_VIT = "intern_vit_6b"
# config.json keys that only the remote code or the original training set up reads
_REMOTE_ONLY_KEYS = (
    "architectures",
    "auto_map",
    "_name_or_path",
    "attn_implementation",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "use_flash_attn",
    "torch_dtype",
    "dtype",
    "transformers_version",
)
# InternLM2 config field -> Llama config field (InternVL2.5-8B/26B and Sa2VA-8B/26B)
_INTERNLM2_TO_LLAMA = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "hidden_act": "hidden_act",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "bias": "attention_bias",
    "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}


def read_folder_config(path: str | Path) -> dict[str, Any]:
    """`config.json` of a model folder, or a clear error naming the folder."""
    file = Path(path).expanduser() / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found (a model folder needs its config.json)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from error


def is_official_folder(path: str | Path) -> bool:
    """True for an official InternVL original or Sa2VA release (remote-code config.json)."""
    return read_folder_config(path).get("model_type") in OFFICIAL_MODEL_TYPES


def is_sa2va_release(path: str | Path | None) -> bool:
    """True for a `ByteDance/Sa2VA-*` HF release folder (holds `text_hidden_fcs`, SAM 2)."""
    if path is None or not (Path(path).expanduser() / "config.json").is_file():
        return False
    return read_folder_config(path).get("model_type") == "sa2va_chat"


def check_supported(cfg: Mapping[str, Any], source: str) -> None:
    """Refuse what the HF-native InternVL cannot hold, saying why."""
    vision = cfg.get("vision_config") or {}
    vision_kind = vision.get("model_type") or (vision.get("architectures") or ["?"])[0]
    if vision_kind not in (INTERN_VIT, "InternVisionModel"):
        raise ValueError(
            f"{source}: vision model {vision_kind!r} (architectures "
            f"{cfg.get('architectures')}) is not supported. Sa2VA variants built on "
            "Qwen2.5-VL / Qwen3-VL are not: this project's MLLM is InternVL (InternViT "
            "vision). Use an InternVL-based release (Sa2VA-1B/4B/8B/26B, Sa2VA-InternVL3-*)."
        )
    if cfg.get("ps_version", "v2") != "v2":
        raise ValueError(
            f"{source}: ps_version {cfg['ps_version']!r}; transformers' InternVL implements "
            "only the v2 pixel shuffle of every InternVL2.5/3 and Sa2VA release"
        )
    if "llm_config" not in cfg:
        raise ValueError(f"{source}: config.json has no llm_config")


def vision_config(vision: Mapping[str, Any]) -> dict[str, Any]:
    """InternViT (`intern_vit_6b`) config -> `InternVLVisionConfig` kwargs."""
    image, patch = vision["image_size"], vision["patch_size"]
    return {
        "hidden_size": vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "hidden_act": vision.get("hidden_act", "gelu"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "norm_type": vision.get("norm_type", "rms_norm"),
        "attention_bias": vision.get("qkv_bias", False),
        "use_qk_norm": vision.get("qk_normalization", False),
        "num_channels": vision.get("num_channels", 3),
        "image_size": [image, image] if isinstance(image, int) else list(image),
        "patch_size": [patch, patch] if isinstance(patch, int) else list(patch),
    }


def text_config(llm: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The LLM's config for transformers: Qwen2 / Phi-3 as they are, InternLM2 as Llama
    (its weights are renamed and its fused `wqkv` split by `official_to_sa2va`)."""
    model_type = llm.get("model_type")
    if model_type in ("qwen2", "phi3", "llama"):
        return {k: v for k, v in llm.items() if k not in _REMOTE_ONLY_KEYS}
    if model_type == "internlm2":
        converted = {new: llm[old] for old, new in _INTERNLM2_TO_LLAMA.items() if old in llm}
        return {"model_type": "llama", **converted}
    raise ValueError(
        f"{source}: LLM family {model_type!r} is not supported (qwen2, internlm2, phi3 are)"
    )


def load_official_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, without remote code (InternLM2's own class needs it)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (ValueError, OSError) as error:
        raise ValueError(
            f"{path}: its tokenizer cannot be loaded without remote code ({error}). "
            "InternLM2-based folders (Sa2VA-8B/26B) name InternLM2Tokenizer, which is "
            "remote code: give the folder a transformers-native tokenizer (tokenizer.json and "
            "a tokenizer_config.json naming a transformers class) that encodes identically"
        ) from error


def read_safetensors(path: str | Path, keep: Callable[[str], bool]) -> dict[str, Tensor]:
    """The tensors whose names pass `keep`, from every `*.safetensors` file of a folder
    (only those are read: a 26B release's LLM is not loaded to get its SAM 2)."""
    from safetensors import safe_open

    shards = sorted(Path(path).expanduser().glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path}: folder holds no .safetensors files")
    tensors = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            names = handle.keys()  # a safetensors handle is not a mapping
            tensors.update({k: handle.get_tensor(k) for k in names if keep(k)})
    return tensors


def _is_sa2va_head(key: str) -> bool:
    """Keys of a Sa2VA release outside the InternVL chat model."""
    return key.startswith(("text_hidden_fcs.", "grounding_encoder."))


def load_internvl_weights(model: InternVLForConditionalGeneration, path: str | Path) -> None:
    """The InternVL part of an official folder, renamed by `official_to_sa2va`, loaded
    strictly (`lm_head.weight` may be absent only when the LLM ties it to the embeddings)."""
    text = model.config.text_config
    state = official_to_sa2va(
        read_safetensors(path, lambda k: not _is_sa2va_head(k)),
        text.model_type,
        text.num_attention_heads,
        text.num_key_value_heads,
    )
    # keys the map does not know keep their name and are reported as unexpected
    mllm_state = {k.removeprefix("mllm."): v for k, v in state.items()}
    tied = ["lm_head.weight"] if model.config.tie_word_embeddings else []
    load_checked(model, mllm_state, f"official InternVL weights in {path}", tied)


def load_release_heads(model: nn.Module, path: str | Path, with_sam2: bool) -> list[str]:
    """Load a Sa2VA release's `text_hidden_fcs` (and SAM 2 when `with_sam2`) into a
    `Sa2VA` strictly; returns the loaded prefixes. The InternVL part is loaded by
    `sa2va.model.mllm.build_mllm` and SAM 2 must be in the release when asked for."""
    text = model.mllm.config.text_config
    wanted = ("text_hidden_fcs.", "grounding_encoder.") if with_sam2 else ("text_hidden_fcs.",)
    state = official_to_sa2va(
        read_safetensors(path, lambda k: k.startswith(wanted)),
        text.model_type,
        text.num_attention_heads,
        text.num_key_value_heads,
    )
    prefixes = ("text_hidden_fcs.", "sam2.") if with_sam2 else ("text_hidden_fcs.",)
    others = [k for k in model.state_dict() if not k.startswith(prefixes)]
    load_checked(model, state, f"Sa2VA release {path}", others)
    return list(prefixes)


def release_has_sam2(path: str | Path) -> bool:
    """Whether a Sa2VA release folder holds SAM 2 (`grounding_encoder.sam2_model.*`)."""
    from safetensors import safe_open

    for shard in sorted(Path(path).expanduser().glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            names = handle.keys()
            if any(k.startswith("grounding_encoder.") for k in names):
                return True
    return False
