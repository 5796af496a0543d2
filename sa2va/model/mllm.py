"""InternVL (HF-native `InternVLForConditionalGeneration`), its tokenizer and image processor.

Real models load from a local `OpenGVLab/InternVL3-*-hf` directory; the tiny model is built
from an `InternVLConfig` and a byte-level BPE tokenizer trained here, so nothing touches a
hub and no remote code runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SEG_TOKEN = "[SEG]"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
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
    "Frame1: Frame2: Frame3: Frame4: Frame5: Frame6: Frame7: Frame8:",
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
    tokenizer.add_tokens([SEG_TOKEN], special_tokens=True)
    return tokenizer


@dataclass
class MLLMParts:
    """What the joint model needs from the MLLM side."""

    model: InternVLForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    image_processor: GotOcr2ImageProcessorPil
    image_seq_length: int  # LLM tokens per image tile


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
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    load_weights: bool = True,
) -> MLLMParts:
    """Build InternVL from a local HF directory (`path`) or from config kwargs (tiny).

    `load_weights=False` builds the architecture of `path` without reading its weights
    (used when a full trained checkpoint is loaded next, so nothing pretrained can leak
    into an export).
    """
    torch_dtype = getattr(torch, dtype)
    if path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = GotOcr2ImageProcessorPil.from_pretrained(path)
        if load_weights:
            from sa2va.model.checkpoints import check_loading_info

            model, loading_info = InternVLForConditionalGeneration.from_pretrained(
                path,
                dtype=torch_dtype,
                attn_implementation=attn_implementation,
                output_loading_info=True,
            )
            check_loading_info(loading_info, f"InternVL checkpoint {path}")
        else:
            hf_config = InternVLConfig.from_pretrained(path)
            hf_config._attn_implementation = attn_implementation
            model = InternVLForConditionalGeneration(hf_config).to(torch_dtype)
    elif config is not None:
        tokenizer = build_tiny_tokenizer(tokenizer_vocab_size)
        # A real-size config keeps its own vocab_size (the planner needs the true embedding
        # shapes); the tiny model's vocabulary is its tokenizer's.
        vocab_size = max(config["text_config"].get("vocab_size", 0), len(tokenizer))
        hf_config = InternVLConfig(
            **{k: v for k, v in config.items() if k not in ("vision_config", "text_config")},
            vision_config=dict(config["vision_config"]),
            text_config={**config["text_config"], "vocab_size": vocab_size},
            image_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN),
        )
        hf_config._attn_implementation = attn_implementation
        model = InternVLForConditionalGeneration(hf_config).to(torch_dtype)
        size = hf_config.vision_config.image_size[0]
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": size, "width": size},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
    else:
        raise ValueError("model.mllm needs either `path` (local HF checkpoint) or `config`")

    image_processor.crop_to_patches = max_tiles > 1
    image_processor.max_patches = max_tiles
    if SEG_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([SEG_TOKEN], special_tokens=True)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.text_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return MLLMParts(model, tokenizer, image_processor, image_seq_length(model.config))
