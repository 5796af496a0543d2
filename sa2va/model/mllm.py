"""InternVL (HF-native `InternVLForConditionalGeneration`), its tokenizer, image processor
and chat template.

Real models load from a local folder: an `OpenGVLab/InternVL3-*-hf` folder, or an official
folder (a `ByteDance/Sa2VA-*` release or an `OpenGVLab/InternVL*` original, converted by
`sa2va.model.official`); the tiny model is built from an `InternVLConfig` and a byte-level BPE
tokenizer trained here, so nothing touches a hub and no remote code runs.

Every model gets the official Sa2VA vocabulary (`SA2VA_SPECIAL_TOKENS` added, embeddings
resized to the tokenizer), and ties `lm_head` to the embeddings only when its text config
says so (`tie_like_text_config`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from sa2va.model.checkpoints import check_loading_info
from sa2va.model.official import (
    check_supported,
    is_official_folder,
    load_internvl_weights,
    load_official_tokenizer,
    read_folder_config,
    text_config,
    vision_config,
)

SEG_TOKEN = "[SEG]"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
# Added by the official Sa2VA to every tokenizer, in this order (so the ids match its releases)
SA2VA_SPECIAL_TOKENS = [SEG_TOKEN, "<p>", "</p>", "<vp>", "</vp>"]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Text the tiny tokenizer is trained on: the prompt/answer vocabulary of this task plus
# enough plain English that arbitrary prompts tokenise into sensible pieces.
_TINY_CORPUS = [
    "Please segment the blood vessel.",
    "Please segment the blood vessels.",
    "Segment the retinal arteries only.",
    "Segment vessels and optic disc.",
    "Sure, it is done. There is no vessel in this image.",
    "user assistant system You are a helpful medical imaging assistant.",
    "artery vein capillary retina choroid layer OCT optical coherence tomography scan",
    "the a an of in on and or to with from for is are this that these what where which",
    "0 1 2 3 4 5 6 7 8 9 , . ; : ! ? ( ) [ ] < > / -",
]


def build_tiny_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer with InternVL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = CHAT_TOKENS + [IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[3:],
    )
    tokenizer.add_tokens(SA2VA_SPECIAL_TOKENS, special_tokens=True)
    return tokenizer


@dataclass(frozen=True)
class ChatTemplate:
    """One of the official Sa2VA prompt templates (xtuner's, as its configs name them).

    A turn is `instruction.format(input=prompt)` (not supervised), then the answer and
    `suffix` (supervised: the suffix ends the answer, the official `SUFFIX_AS_EOS`), then
    `sep` (not supervised). `name` is the official config's name for it (`template` in a
    release's config.json).
    """

    name: str
    system: str
    instruction: str
    suffix: str
    sep: str


_IM_TEMPLATE = ChatTemplate(
    name="qwen_chat",
    system="<|im_start|>system\n{system}<|im_end|>\n",
    instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    suffix="<|im_end|>",
    sep="\n",
)
CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    "qwen_chat": _IM_TEMPLATE,  # Sa2VA-1B, Sa2VA-InternVL3-*
    # Sa2VA-8B, Sa2VA-26B: the same text; the BOS differs (it comes from the tokenizer)
    "internlm2_chat": replace(_IM_TEMPLATE, name="internlm2_chat"),
    "phi3_chat": ChatTemplate(  # Sa2VA-4B
        name="phi3_chat",
        system="<|system|>\n{system}<|end|>\n",
        instruction="<|user|>\n{input}<|end|>\n<|assistant|>\n",
        suffix="<|end|>",
        sep="\n",
    ),
}
# the official template of each LLM family, for folders that do not name one of ours
DEFAULT_TEMPLATES = {
    "qwen2": "qwen_chat",
    "internlm2": "internlm2_chat",
    "llama": "internlm2_chat",  # InternLM2 as transformers' HF-native InternVL holds it
    "phi3": "phi3_chat",
}


def chat_template(name: str) -> ChatTemplate:
    """The template called `name` in the official configs (`template` in config.json)."""
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]


def default_template(text_model_type: str) -> str:
    """The official template of an LLM family (`model_type` of the text config)."""
    if text_model_type not in DEFAULT_TEMPLATES:
        raise ValueError(
            f"no default chat template for LLM family {text_model_type!r}: set "
            f"model.mllm.template to one of {sorted(CHAT_TEMPLATES)}"
        )
    return DEFAULT_TEMPLATES[text_model_type]


def bos_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The BOS the official code puts before a conversation: the tokenizer's own (InternLM2:
    `<s>`), none for Qwen tokenizers (xtuner's rule; Qwen's `encode` adds none either)."""
    if tokenizer.bos_token_id is None or type(tokenizer).__name__.startswith("Qwen"):
        return []
    return [tokenizer.bos_token_id]


def tie_like_text_config(config: InternVLConfig) -> InternVLConfig:
    """Tie `lm_head` to the embeddings exactly when the text config says so.

    `InternVLConfig` ties at the top level by default even when its text config is untied;
    a checkpoint load then silently overwrites one matrix with the other.
    """
    config.tie_word_embeddings = bool(config.text_config.tie_word_embeddings)
    return config


def add_sa2va_vocabulary(tokenizer: PreTrainedTokenizerBase) -> None:
    """Add the official special tokens the tokenizer lacks (a Sa2VA release has them)."""
    missing = [t for t in SA2VA_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)


@dataclass
class MLLMParts:
    """What the joint model needs from the MLLM side."""

    model: InternVLForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    image_processor: GotOcr2ImageProcessorPil
    image_seq_length: int  # LLM tokens per image tile
    template: ChatTemplate


def image_seq_length(config: InternVLConfig) -> int:
    """Tokens per tile after pixel shuffle, as InternVLProcessor computes it."""
    vision = config.vision_config
    side = vision.image_size[0] // vision.patch_size[0]
    return int(side * side * config.downsample_ratio**2)


def build_mllm(
    path: str | None = None,
    config: Mapping[str, Any] | None = None,
    tokenizer_vocab_size: int = 1000,
    max_tiles: int = 1,
    template: str | None = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    load_weights: bool = True,
) -> MLLMParts:
    """Build InternVL from a local folder (`path`) or from config kwargs (tiny, planner).

    `path` is an `InternVL*-hf` folder or an official one (Sa2VA release, InternVL original;
    see `sa2va.model.official`). `max_tiles` bounds InternVL's dynamic tiling of a single
    image (a thumbnail is added when it tiles); each video frame is one tile. `template` names
    the chat template (None: the folder's own, else its LLM family's). `load_weights=False`
    builds the architecture of `path` without reading its weights (used when a full trained
    checkpoint is loaded next, so nothing pretrained can leak into an export).
    """
    torch_dtype = getattr(torch, dtype)
    folder_template = None
    if path is not None:
        if is_official_folder(path):
            model, tokenizer, image_processor, folder_template = _load_official_folder(
                path, torch_dtype, attn_implementation, load_weights
            )
        else:
            model, tokenizer, image_processor = _load_hf_folder(
                path, torch_dtype, attn_implementation, load_weights
            )
        add_sa2va_vocabulary(tokenizer)
        if model.get_input_embeddings().num_embeddings != len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))  # as the official code always does
    elif config is not None:
        model, tokenizer, image_processor = _build_from_config(
            config, tokenizer_vocab_size, torch_dtype, attn_implementation
        )
    else:
        raise ValueError("model.mllm needs either `path` (local checkpoint folder) or `config`")

    image_processor.crop_to_patches = max_tiles > 1
    image_processor.min_patches = 1
    image_processor.max_patches = max_tiles
    model.config.text_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    name = template or folder_template or default_template(model.config.text_config.model_type)
    return MLLMParts(
        model, tokenizer, image_processor, image_seq_length(model.config), chat_template(name)
    )


def image_embeddings(model: InternVLForConditionalGeneration, tower_output: Tensor) -> Tensor:
    """(tiles, tokens, D) image embeddings for the LLM from the vision tower's last hidden
    state: ``InternVLModel.get_image_features`` after its tower call (CLS token dropped as
    configured, pixel shuffle, projector), restated so that a tower output computed elsewhere
    (a frozen tower's cached one, :mod:`sa2va.model.feature_cache`) can enter."""
    inner, config = model.model, model.config
    features = tower_output
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:, :]
    tiles, side = features.shape[0], int(features.shape[1] ** 0.5)
    features = inner.pixel_shuffle(
        features.reshape(tiles, side, side, -1), scale_factor=config.downsample_ratio
    )
    return inner.multi_modal_projector(features.reshape(tiles, -1, features.shape[-1]))


def imagenet_image_processor(size: int) -> GotOcr2ImageProcessorPil:
    """InternVL's preprocessing: `size`-px tiles, ImageNet normalisation (tiling set later)."""
    return GotOcr2ImageProcessorPil(
        size={"height": size, "width": size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )


def _load_hf_folder(
    path: str, torch_dtype: torch.dtype, attn_implementation: str, load_weights: bool
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase, GotOcr2ImageProcessorPil]:
    """An `InternVL*-hf` folder (transformers' own layout), tied as its text config says."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    image_processor = GotOcr2ImageProcessorPil.from_pretrained(path)
    hf_config = tie_like_text_config(InternVLConfig.from_pretrained(path))
    hf_config._attn_implementation = attn_implementation
    if not load_weights:
        model = InternVLForConditionalGeneration(hf_config).to(torch_dtype)
        return model, tokenizer, image_processor
    model, loading_info = InternVLForConditionalGeneration.from_pretrained(
        path,
        config=hf_config,
        dtype=torch_dtype,
        attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    check_loading_info(loading_info, f"InternVL checkpoint {path}")
    return model, tokenizer, image_processor


def _load_official_folder(
    path: str | Path, torch_dtype: torch.dtype, attn_implementation: str, load_weights: bool
) -> tuple[
    InternVLForConditionalGeneration, PreTrainedTokenizerBase, GotOcr2ImageProcessorPil, str | None
]:
    """An official folder (`sa2va.model.official`): model, tokenizer, image processor and the
    `template` it names (None when it names none of the official Sa2VA templates)."""
    cfg = read_folder_config(path)
    source = f"{Path(path).expanduser() / 'config.json'}"
    tokenizer = load_official_tokenizer(path)
    image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"{path}: the tokenizer has no {IMG_CONTEXT_TOKEN} token")
    hf_config = official_internvl_config(cfg, image_token_id, source)
    hf_config._attn_implementation = attn_implementation
    with _default_dtype(torch_dtype):
        model = InternVLForConditionalGeneration(hf_config)
    if load_weights:
        load_internvl_weights(model, path)
    image_processor = imagenet_image_processor(hf_config.vision_config.image_size[0])
    # an InternVL original names InternVL's own template (e.g. internvl2_5): not Sa2VA's
    template = cfg.get("template") if cfg.get("template") in CHAT_TEMPLATES else None
    return model, tokenizer, image_processor, template


def official_internvl_config(
    cfg: Mapping[str, Any], image_token_id: int, source: str
) -> InternVLConfig:
    """An official `config.json` (dict) -> `InternVLConfig`, tied as its LLM config says."""
    check_supported(cfg, source)
    converted = InternVLConfig(
        vision_config=vision_config(cfg["vision_config"]),
        text_config=text_config(cfg["llm_config"], source),
        downsample_ratio=cfg.get("downsample_ratio", 0.5),
        vision_feature_layer=cfg.get("select_layer", -1),
        projector_hidden_act="gelu",
        image_token_id=image_token_id,
    )
    return tie_like_text_config(converted)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in `dtype` (an 8B model is not first made in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def internvl_config(
    config: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase
) -> InternVLConfig:
    """A model config's `mllm.config` kwargs -> `InternVLConfig`, tied as its text config says.

    A real-size config keeps its own `vocab_size` (the planner needs the true embedding
    shapes); the tiny model's vocabulary is its tokenizer's.
    """
    vocab_size = max(config["text_config"].get("vocab_size", 0), len(tokenizer))
    hf_config = InternVLConfig(
        **{k: v for k, v in config.items() if k not in ("vision_config", "text_config")},
        vision_config=dict(config["vision_config"]),
        text_config={**config["text_config"], "vocab_size": vocab_size},
        image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN),
    )
    return tie_like_text_config(hf_config)


def _build_from_config(
    config: Mapping[str, Any],
    tokenizer_vocab_size: int,
    torch_dtype: torch.dtype,
    attn_implementation: str,
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase, GotOcr2ImageProcessorPil]:
    """Random weights from config kwargs, with the tiny tokenizer."""
    tokenizer = build_tiny_tokenizer(tokenizer_vocab_size)
    hf_config = internvl_config(config, tokenizer)
    hf_config._attn_implementation = attn_implementation
    model = InternVLForConditionalGeneration(hf_config).to(torch_dtype)
    return model, tokenizer, imagenet_image_processor(hf_config.vision_config.image_size[0])
