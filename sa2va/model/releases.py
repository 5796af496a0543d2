"""The published checkpoints this project reads, as key names and shapes (no weights).

Each supported release is described by its published ``config.json`` numbers, and
:func:`release_shapes` writes out the key names and shapes its files hold, from the module
layout of the **official** code (InternVL's ``modeling_intern_vit.py``, Qwen2 /
``modeling_internlm2.py``, the Sa2VA ``Sa2VAChatModel`` and Meta's SAM 2), not from this
project's model. :func:`synthetic_state` turns that into a state dict of meta tensors (or
small real ones), so tests can require every release to load strictly into the project
config shaped like it, without downloading anything. The formulas are checked against the
official tiny chat model of ``tests/fixtures/official_sa2va`` (produced by the official code).

Sources of the numbers (the releases' ``config.json``: ``llm_config`` / ``vision_config``):

* InternViT-300M-448px-V2_5 (every release but 26B): hidden 1024, 24 layers, 16 heads,
  MLP 4096, qkv bias, LayerNorm. InternViT-6B-448px-V2_5 (InternVL2.5-26B): hidden 3200,
  45 of its 48 layers, 25 heads, MLP 12800, no qkv bias, qk RMS-norm, RMSNorm.
* Qwen2.5 text (InternVL2.5-1B/4B, InternVL3-*): 0.5B 896/24 layers/14 heads/2 KV/4864;
  1.5B 1536/28/12/2/8960; 3B 2048/36/16/2/11008; 7B 3584/28/28/4/18944;
  14B 5120/48/40/8/13824; vocabulary 151,674 (Qwen2.5 + InternVL's 9 tokens).
* InternLM2.5 text (InternVL2.5-8B/26B): 7B 4096/32/32/8/14336; 20B 6144/48/48/8/16384;
  vocabulary 92,553; no attention bias (``bias: false``).
* Sa2VA adds ``[SEG] <p> </p> <vp> </vp>`` and resizes to ``len(tokenizer)``: +5 rows
  (151,679 / 92,558); ``text_hidden_fcs`` maps the LLM width to SAM 2's 256.
* SAM 2.0 Hiera-L (``sam2_hiera_large.pt``, the SAM 2 of every Sa2VA): the ``sam2``
  package's own ``configs/sam2/sam2_hiera_l.yaml``.

The InternVL2.5-4B, -8B and InternVL3-2B numbers were cross-checked against copies of their
``config.json`` in public code (the code search corpus); Sa2VA-4B's template and the +5
vocabulary come from the official Sa2VA code (``tools/convert_to_hf.py`` sets
``vocab_size = len(tokenizer)``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

Shapes = dict[str, tuple[int, ...]]
SA2VA_ADDED_TOKENS = ("[SEG]", "<p>", "</p>", "<vp>", "</vp>")


@dataclass(frozen=True)
class VisionSpec:
    """InternViT (``vision_config``)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    qkv_bias: bool = True
    qk_norm: bool = False
    norm: str = "layer_norm"  # or rms_norm (weight only)
    image: int = 448
    patch: int = 14


@dataclass(frozen=True)
class TextSpec:
    """The LLM (``llm_config``); ``vocab`` is the base model's, before Sa2VA adds tokens."""

    family: str  # qwen2 | internlm2
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Release:
    """One published checkpoint: its architecture, file layout and the conf/model shaped
    like it. ``layout``: ``hf_release`` (ByteDance/Sa2VA-*), ``internvl`` (OpenGVLab's
    original InternVL folders, no SAM 2) or ``xtuner`` (the official training ``.pth``)."""

    name: str
    vision: VisionSpec
    text: TextSpec
    config: str  # conf/model/<config>.yaml
    layout: str = "hf_release"
    downsample: float = 0.5
    sam2_yaml: str | None = "sam2/sam2_hiera_l.yaml"  # under the sam2 package's configs/

    @property
    def vocab(self) -> int:
        added = 0 if self.layout == "internvl" else len(SA2VA_ADDED_TOKENS)
        return self.text.vocab + added


INTERNVIT_300M = VisionSpec(1024, 24, 16, 4096)
INTERNVIT_6B = VisionSpec(3200, 45, 25, 12800, qkv_bias=False, qk_norm=True, norm="rms_norm")
QWEN2_5_0_5B = TextSpec("qwen2", 896, 24, 14, 2, 4864, 151674)
QWEN2_5_1_5B = TextSpec("qwen2", 1536, 28, 12, 2, 8960, 151674)
QWEN2_5_3B = TextSpec("qwen2", 2048, 36, 16, 2, 11008, 151674)
QWEN2_5_7B = TextSpec("qwen2", 3584, 28, 28, 4, 18944, 151674)
QWEN2_5_14B = TextSpec("qwen2", 5120, 48, 40, 8, 13824, 151674)
INTERNLM2_5_7B = TextSpec("internlm2", 4096, 32, 32, 8, 14336, 92553)
INTERNLM2_5_20B = TextSpec("internlm2", 6144, 48, 48, 8, 16384, 92553)

_RELEASES = [
    # ByteDance Sa2VA v1 (InternVL2.5 based)
    Release("ByteDance/Sa2VA-1B", INTERNVIT_300M, QWEN2_5_0_5B, "sa2va_1b"),
    Release("ByteDance/Sa2VA-4B", INTERNVIT_300M, QWEN2_5_3B, "sa2va_4b"),
    Release("ByteDance/Sa2VA-8B", INTERNVIT_300M, INTERNLM2_5_7B, "sa2va_8b_internvl2_5"),
    Release("ByteDance/Sa2VA-26B", INTERNVIT_6B, INTERNLM2_5_20B, "sa2va_26b"),
    # ByteDance Sa2VA on InternVL3
    Release("ByteDance/Sa2VA-InternVL3-2B", INTERNVIT_300M, QWEN2_5_1_5B, "sa2va_2b"),
    Release("ByteDance/Sa2VA-InternVL3-8B", INTERNVIT_300M, QWEN2_5_7B, "sa2va_8b"),
    Release("ByteDance/Sa2VA-InternVL3-14B", INTERNVIT_300M, QWEN2_5_14B, "sa2va_14b"),
    # official training checkpoints (xtuner .pth); the user's guide takes SAM 2 from Sa2VA-26B.pth
    Release("Sa2VA-26B.pth", INTERNVIT_6B, INTERNLM2_5_20B, "sa2va_26b", layout="xtuner"),
    Release("Sa2VA-InternVL3-8B.pth", INTERNVIT_300M, QWEN2_5_7B, "sa2va_8b", layout="xtuner"),
    # OpenGVLab's original InternVL3 folders (the user's starting MLLM)
    Release("OpenGVLab/InternVL3-1B", INTERNVIT_300M, QWEN2_5_0_5B, "sa2va_1b", "internvl"),
    Release("OpenGVLab/InternVL3-2B", INTERNVIT_300M, QWEN2_5_1_5B, "sa2va_2b", "internvl"),
    Release("OpenGVLab/InternVL3-8B", INTERNVIT_300M, QWEN2_5_7B, "sa2va_8b", "internvl"),
    Release("OpenGVLab/InternVL3-14B", INTERNVIT_300M, QWEN2_5_14B, "sa2va_14b", "internvl"),
]
RELEASES: dict[str, Release] = {release.name: release for release in _RELEASES}


# --------------------------------------------------------------------------- shapes


def internvit_shapes(v: VisionSpec) -> Shapes:
    """``vision_model.*`` of InternVL's ``InternVisionModel``."""
    c, side = v.hidden, v.image // v.patch
    shapes: Shapes = {
        "embeddings.class_embedding": (1, 1, c),
        "embeddings.patch_embedding.weight": (c, 3, v.patch, v.patch),
        "embeddings.patch_embedding.bias": (c,),
        "embeddings.position_embedding": (1, side * side + 1, c),
    }
    norm_params = ("weight", "bias") if v.norm == "layer_norm" else ("weight",)
    for i in range(v.layers):
        layer = {
            "attn.qkv.weight": (3 * c, c),
            "attn.proj.weight": (c, c),
            "attn.proj.bias": (c,),
            "ls1": (c,),
            "ls2": (c,),
            "mlp.fc1.weight": (v.intermediate, c),
            "mlp.fc1.bias": (v.intermediate,),
            "mlp.fc2.weight": (c, v.intermediate),
            "mlp.fc2.bias": (c,),
            **{f"norm{n}.{p}": (c,) for n in (1, 2) for p in norm_params},
        }
        if v.qkv_bias:
            layer["attn.qkv.bias"] = (3 * c,)
        if v.qk_norm:
            layer |= {"attn.q_norm.weight": (c,), "attn.k_norm.weight": (c,)}
        shapes |= {f"encoder.layers.{i}.{k}": s for k, s in layer.items()}
    return shapes


def mlp1_shapes(v: VisionSpec, t: TextSpec, downsample: float) -> Shapes:
    """``mlp1`` = LayerNorm(4C), Linear(4C, H), GELU, Linear(H, H) after pixel shuffle."""
    merged = v.hidden * int(1 / downsample) ** 2
    return {
        "0.weight": (merged,),
        "0.bias": (merged,),
        "1.weight": (t.hidden, merged),
        "1.bias": (t.hidden,),
        "3.weight": (t.hidden, t.hidden),
        "3.bias": (t.hidden,),
    }


def text_shapes(t: TextSpec, vocab: int) -> Shapes:
    """``language_model.*``: Qwen2ForCausalLM or InternLM2ForCausalLM (untied head)."""
    h, head_dim = t.hidden, t.hidden // t.heads
    q, kv = t.heads * head_dim, t.kv_heads * head_dim
    if t.family == "qwen2":
        shapes: Shapes = {
            "model.embed_tokens.weight": (vocab, h),
            "model.norm.weight": (h,),
            "lm_head.weight": (vocab, h),
        }
        layer = {
            "self_attn.q_proj.weight": (q, h),
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (t.intermediate, h),
            "mlp.up_proj.weight": (t.intermediate, h),
            "mlp.down_proj.weight": (h, t.intermediate),
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
        }
    elif t.family == "internlm2":
        shapes = {
            "model.tok_embeddings.weight": (vocab, h),
            "model.norm.weight": (h,),
            "output.weight": (vocab, h),
        }
        layer = {
            "attention.wqkv.weight": (q + 2 * kv, h),
            "attention.wo.weight": (h, q),
            "feed_forward.w1.weight": (t.intermediate, h),
            "feed_forward.w3.weight": (t.intermediate, h),
            "feed_forward.w2.weight": (h, t.intermediate),
            "attention_norm.weight": (h,),
            "ffn_norm.weight": (h,),
        }
    else:
        raise ValueError(f"text family {t.family!r}: not one of Sa2VA's (qwen2, internlm2)")
    for i in range(t.layers):
        shapes |= {f"model.layers.{i}.{k}": s for k, s in layer.items()}
    return shapes


@contextmanager
def on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no files).

    accelerate's ``init_empty_weights`` moves each parameter to meta as it is registered;
    other tensors stay ordinary CPU tensors, so a constructor can read back what it computes
    (SAM 2's Hiera turns a ``torch.linspace`` into Python drop-path rates), which a
    ``torch.device("meta")`` context forbids. Buffers (position tables, a few MiB) stay on
    the CPU.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def sam2_yaml_path(name: str) -> Path:
    """A yaml of the ``sam2`` package's own ``configs/`` folder (Meta's, not this repo's)."""
    from sa2va.model.sam2 import import_sam2

    import_sam2()
    import sam2

    path = Path(sam2.__file__).parent / "configs" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config in the installed sam2 package")
    return path


def sam2_shapes(yaml_path: str | Path) -> Shapes:
    """Meta's SAM 2 state-dict names and shapes for a SAM 2 yaml (``model:`` node)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sa2va.model.sam2 import import_sam2

    import_sam2()
    with on_meta():
        model = instantiate(OmegaConf.load(yaml_path).model, _recursive_=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def release_shapes(release: Release, sam2: Shapes | None = None) -> Shapes:
    """Every key and shape of ``release``'s weights, in its own layout.

    ``sam2`` (Meta names) defaults to the shapes of ``release.sam2_yaml``.
    """
    text_prefix = "language_model."
    parts: Shapes = {f"vision_model.{k}": s for k, s in internvit_shapes(release.vision).items()}
    parts |= {
        f"mlp1.{k}": s
        for k, s in mlp1_shapes(release.vision, release.text, release.downsample).items()
    }
    parts |= {text_prefix + k: s for k, s in text_shapes(release.text, release.vocab).items()}
    if release.layout == "internvl":
        return parts
    if sam2 is None:
        if release.sam2_yaml is None:
            raise ValueError(f"{release.name}: a Sa2VA release needs its SAM 2 shapes")
        sam2 = sam2_shapes(sam2_yaml_path(release.sam2_yaml))
    prompt_dim = sam2["no_mem_embed"][-1]  # SAM 2's hidden_dim: text_hidden_fcs' output
    h = release.text.hidden
    fcs = {
        "text_hidden_fcs.0.weight": (h, h),
        "text_hidden_fcs.0.bias": (h,),
        "text_hidden_fcs.2.weight": (prompt_dim, h),
        "text_hidden_fcs.2.bias": (prompt_dim,),
    }
    if release.layout == "xtuner":
        mllm = {f"mllm.model.{k}": s for k, s in parts.items()}
        grounding = {f"grounding_encoder.sam2_model.{k}": s for k, s in sam2.items()}
        return mllm | grounding | fcs
    # the release renames CXBlock's layer scale (official tools/convert_to_hf.py)
    grounding = {
        "grounding_encoder.sam2_model." + re.sub(r"\.gamma$", ".g_weight", k): s
        for k, s in sam2.items()
    }
    return parts | grounding | fcs


LLM_FAMILIES = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "internlm2"}


def release_from_config(name: str, config: Mapping[str, Any], sam2_yaml: str | None) -> Release:
    """The :class:`Release` a Sa2VA release ``config.json`` (``Sa2VAChatConfig``) describes.

    Only InternVL-based releases exist in this layout; the Qwen2.5-VL / Qwen3-VL based Sa2VA
    models (``Sa2VAChatConfigQwen``) are not supported and fail here by name.
    """
    vision, llm = config.get("vision_config") or {}, config.get("llm_config") or {}
    arch = (llm.get("architectures") or ["?"])[0]
    if arch not in LLM_FAMILIES or "InternVisionModel" not in vision.get("architectures", []):
        raise ValueError(
            f"{name}: LLM {arch}, vision {vision.get('architectures')}: not an InternVL-based "
            "Sa2VA (Qwen2.5-VL / Qwen3-VL based Sa2VA models are not supported)"
        )
    return Release(
        name=name,
        vision=VisionSpec(
            vision["hidden_size"],
            vision["num_hidden_layers"],
            vision["num_attention_heads"],
            vision["intermediate_size"],
            vision["qkv_bias"],
            vision["qk_normalization"],
            vision["norm_type"],
            vision["image_size"],
            vision["patch_size"],
        ),
        text=TextSpec(
            LLM_FAMILIES[arch],
            llm["hidden_size"],
            llm["num_hidden_layers"],
            llm["num_attention_heads"],
            llm["num_key_value_heads"],
            llm["intermediate_size"],
            llm["vocab_size"] - len(SA2VA_ADDED_TOKENS),
        ),
        config="",
        downsample=config["downsample_ratio"],
        sam2_yaml=sam2_yaml,
    )


def synthetic_state(
    shapes: Mapping[str, tuple[int, ...]], device: str = "meta", seed: int = 0
) -> dict[str, Tensor]:
    """Tensors of the given shapes: empty meta tensors, or seeded normal CPU tensors (for
    bit-exact round trips at reduced size)."""
    if device == "meta":
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
