"""The joint model: InternVL -> hidden state at [SEG] -> projector -> SAM2 prompt -> mask.

Training uses teacher forcing (the answer, e.g. "Sure, [SEG].", is in `input_ids` and
`labels`), so gradients reach the LLM, the projector and SAM2. Predicting through
`generate` would give none (transformers runs it under `torch.no_grad`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from sa2va.model.feature_cache import FeatureCache, cached_encoders
from sa2va.model.mllm import SEG_TOKEN, build_mllm
from sa2va.model.official import is_sa2va_release, load_release_heads, release_has_sam2
from sa2va.model.processor import Sa2VAProcessor
from sa2va.model.sam2 import build_sam2, upsample
from sa2va.utils import to_plain

DEFAULT_ANSWER = "Sure, [SEG]."


def build_projector(in_dim: int, out_dim: int, hidden_dim: int | None = None, dropout: float = 0.0):
    """`text_hidden_fcs` of the official model: Linear(D,D)-ReLU-Linear(D,out)-Dropout."""
    hidden_dim = hidden_dim or in_dim
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
        nn.Dropout(dropout),
    )


def batch_to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a collated batch's tensors (and its per-sample SAM2 views) to `device`."""
    moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    moved["g_pixel_values"] = [g.to(device) for g in batch["g_pixel_values"]]
    return moved


def _release_sam2(mllm_path: str | None, sam2_ckpt: str | None) -> bool:
    """Whether SAM 2 comes from the Sa2VA release at `mllm_path` (when it holds one)."""
    if not is_sa2va_release(mllm_path) or not release_has_sam2(mllm_path):
        return False
    if sam2_ckpt:
        raise ValueError(
            f"model.mllm.path={mllm_path} is a Sa2VA release holding SAM 2, and "
            f"model.sam2_ckpt={sam2_ckpt} gives another: set model.sam2_ckpt=null to use the "
            "release's SAM 2, or point model.mllm.path at an InternVL folder"
        )
    return True


@dataclass
class Sa2VAOutput:
    lm_loss: Tensor | None
    pred_masks: list[Tensor]  # per sample: (T, M, H, W) mask logits
    seg_counts: list[int]  # [SEG] tokens found per sample
    # per sample: (T, M, h, w) SAM2 low-resolution logits (image_size/4); None for models
    # without them (the U-Net baseline)
    low_res_masks: list[Tensor] | None = None


class Sa2VA(nn.Module):
    """InternVL + SAM2 joined by the `[SEG]` token; built from plain config mappings.

    `config` is kept verbatim so an export can rebuild the same architecture without any
    pretrained file (`load_pretrained=False`), then load only the trained weights.
    """

    def __init__(
        self,
        mllm: Mapping[str, Any],
        sam2: Mapping[str, Any],
        projector: Mapping[str, Any] | None = None,
        sam2_ckpt: str | None = None,
        mask_size: int | None = None,
        mllm_frames: int = 5,
        system_prompt: str | None = None,
        sam2_bf16_norm: bool = False,
        intensity_norm: str = "fixed",
        gradient_checkpointing: bool = False,
        init_from_sa2va: Mapping[str, Any] | None = None,
        load_pretrained: bool = True,
        name: str = "sa2va",
    ) -> None:
        super().__init__()
        mllm, sam2, projector = to_plain(mllm), to_plain(sam2), to_plain(projector)
        init_from_sa2va = to_plain(init_from_sa2va)
        self.config = copy.deepcopy(
            {
                "mllm": dict(mllm),
                "sam2": dict(sam2),
                "projector": dict(projector or {}),
                "sam2_ckpt": sam2_ckpt,
                "mask_size": mask_size,
                "mllm_frames": mllm_frames,
                "system_prompt": system_prompt,
                "sam2_bf16_norm": sam2_bf16_norm,
                "intensity_norm": intensity_norm,
                "gradient_checkpointing": gradient_checkpointing,
                "init_from_sa2va": dict(init_from_sa2va) if init_from_sa2va else None,
                "name": name,
            }
        )
        parts = build_mllm(**mllm, load_weights=load_pretrained)
        self.mllm = parts.model
        self.tokenizer = parts.tokenizer
        self.sam2 = build_sam2(sam2)
        release_sam2 = load_pretrained and _release_sam2(mllm.get("path"), sam2_ckpt)
        if sam2_ckpt and load_pretrained:
            from sa2va.model.checkpoints import load_sam2_checkpoint

            load_sam2_checkpoint(self.sam2, sam2_ckpt)
        text_dim = self.mllm.config.text_config.hidden_size
        self.text_hidden_fcs = build_projector(
            text_dim, self.sam2.sam_prompt_encoder.embed_dim, **(projector or {})
        )
        if load_pretrained and is_sa2va_release(mllm.get("path")):
            load_release_heads(self, mllm["path"], with_sam2=release_sam2)
        if init_from_sa2va and load_pretrained:  # {path, include}: an official Sa2VA checkpoint
            from sa2va.model.checkpoints import load_official_sa2va

            load_official_sa2va(self, **init_from_sa2va)
        self.seg_token_id = self.tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        self.processor = Sa2VAProcessor(
            tokenizer=self.tokenizer,
            image_processor=parts.image_processor,
            image_seq_length=parts.image_seq_length,
            template=parts.template,
            sam2_image_size=self.sam2.image_size,
            mask_size=mask_size,
            mllm_frames=mllm_frames,
            system_prompt=system_prompt,
            sam2_bf16_norm=sam2_bf16_norm,
            intensity_norm=intensity_norm,
        )
        if gradient_checkpointing:
            self.mllm.gradient_checkpointing_enable({"use_reentrant": False})
        # Runtime option, not architecture (see sa2va.model.feature_cache; set by the module).
        self.feature_cache: FeatureCache | None = None

    @property
    def language_model(self) -> nn.Module:
        return self.mllm.model.language_model

    def add_lora(self, lora_config: Any) -> None:
        """Wrap the LLM (not the vision tower) with a peft LoRA adapter."""
        from peft import get_peft_model

        self.mllm.model.language_model = get_peft_model(self.language_model, lora_config)

    def merge_lora(self) -> None:
        """Fold LoRA weights into the LLM (for a plain HF export)."""
        from peft import PeftModel

        if isinstance(self.language_model, PeftModel):
            self.mllm.model.language_model = self.language_model.merge_and_unload()

    # ---- forward pieces -------------------------------------------------------------
    def _mllm_hidden(self, batch: Mapping[str, Any]) -> tuple[Tensor | None, Tensor]:
        out = self.mllm(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"].to(self.mllm.dtype),
            labels=batch.get("labels"),
            output_hidden_states=True,
            return_dict=True,
        )
        return out.loss, out.hidden_states[-1]

    def _seg_embeddings(self, hidden: Tensor, input_ids: Tensor) -> tuple[Tensor, list[int]]:
        """Project last-layer states at every [SEG] position, in reading order."""
        seg_mask = input_ids == self.seg_token_id
        embeddings = self.text_hidden_fcs(hidden[seg_mask])
        return embeddings, seg_mask.sum(1).tolist()

    def decode(
        self, frames: Sequence[Tensor], embeddings: Tensor, counts: Sequence[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Masks for each sample: every [SEG] embedding of a sample prompts all its frames.

        SAM2 is prompted the official way (:class:`~sa2va.model.sam2.LanguagePromptedSAM2`).
        Returns per sample (T, M, S, S) logits at ``mask_size``, upsampled once (bilinear)
        straight from the low-resolution logits, and those (T, M, s, s) low-resolution
        logits (SAM2 image_size/4), on which the official loss is computed.
        """
        lengths = [f.shape[0] for f in frames]
        images = torch.cat(list(frames)).to(self.text_hidden_fcs[0].weight.dtype)
        if not sum(counts):  # no [SEG] generated: no masks, and nothing to decode
            size, low = self.processor.mask_size, self.sam2.image_size // 4
            return (
                [images.new_zeros(t_len, 0, size, size) for t_len in lengths],
                [images.new_zeros(t_len, 0, low, low) for t_len in lengths],
            )
        features = self.sam2.image_features(images)
        image_index, prompt_index = [], []
        frame_offset, prompt_offset = 0, 0
        for t_len, m in zip(lengths, counts, strict=True):
            grid_t, grid_m = torch.meshgrid(torch.arange(t_len), torch.arange(m), indexing="ij")
            image_index.append(frame_offset + grid_t.flatten())
            prompt_index.append(prompt_offset + grid_m.flatten())
            frame_offset, prompt_offset = frame_offset + t_len, prompt_offset + m
        device = images.device
        image_index = torch.cat(image_index).to(device)
        prompt_index = torch.cat(prompt_index).to(device)
        decoded = self.sam2.decode_language(
            features.index_select(image_index), embeddings[prompt_index]
        )
        low_res = decoded.low_res_masks[:, 0]
        logits = upsample(low_res, self.processor.mask_size)
        sizes = [t_len * m for t_len, m in zip(lengths, counts, strict=True)]

        def per_sample(flat: Tensor) -> list[Tensor]:
            chunks = zip(flat.split(sizes), lengths, counts, strict=True)
            return [chunk.view(t_len, m, *chunk.shape[-2:]) for chunk, t_len, m in chunks]

        return per_sample(logits), per_sample(low_res)

    def seg_embeddings(self, batch: Mapping[str, Any]) -> tuple[Tensor | None, Tensor, list[int]]:
        """The language half of `forward`: LM loss, projected [SEG] embeddings, counts per sample.

        Video propagation (`sa2va.video`) prompts SAM2's memory tracker with these itself.
        """
        lm_loss, hidden = self._mllm_hidden(batch)
        embeddings, counts = self._seg_embeddings(hidden, batch["input_ids"])
        return lm_loss, embeddings, counts

    def forward(self, batch: Mapping[str, Any]) -> Sa2VAOutput:
        with cached_encoders(self, batch):  # frozen encoders reuse per-frame outputs
            lm_loss, embeddings, counts = self.seg_embeddings(batch)
            masks, low_res = self.decode(batch["g_pixel_values"], embeddings, counts)
        return Sa2VAOutput(
            lm_loss=lm_loss, pred_masks=masks, seg_counts=counts, low_res_masks=low_res
        )

    # ---- inference --------------------------------------------------------------------
    @torch.no_grad()
    def predict_forward(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        mode: str = "fast",
        answer: str = DEFAULT_ANSWER,
        max_new_tokens: int = 32,
    ) -> dict[str, Any]:
        """Answer text and mask logits (T, M, H, W) for one clip.

        `fast` appends the fixed `answer` and runs one forward pass; `generate` decodes
        the answer autoregressively (as the official model does), then reads the [SEG]
        states from one forward pass over the generated sequence — so both modes give
        identical masks whenever the generated answer equals `answer`.
        """
        batch, texts = self.prepare_inputs(frames, prompts, mode, answer, max_new_tokens)
        out = self(batch)
        return {"text": texts, "masks": out.pred_masks[0], "seg_count": out.seg_counts[0]}

    @torch.no_grad()
    def prepare_inputs(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        mode: str = "fast",
        answer: str = DEFAULT_ANSWER,
        max_new_tokens: int = 32,
    ) -> tuple[dict[str, Any], list[str]]:
        """One clip as an on-device batch without labels, plus its answer texts (see
        `predict_forward` for the two modes)."""
        if mode not in ("fast", "generate"):
            raise ValueError(f"predict mode must be 'fast' or 'generate', got {mode!r}")
        device = self.text_hidden_fcs[0].weight.device
        if mode == "fast":
            sample = self.processor(frames, prompts, [answer] * len(prompts))
            texts = [answer] * len(prompts)
        else:
            sample, texts = self._generate_answers(frames, prompts, max_new_tokens, device)
        batch = batch_to_device(self.processor.collate([sample]), device)
        batch.pop("labels")
        return batch, texts

    def _generate_answers(
        self, frames: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int, device
    ) -> tuple[dict[str, Tensor], list[str]]:
        """Generate each turn's answer in order, feeding earlier answers back as history."""
        answers: list[str] = []
        suffix = self.processor.template.suffix
        for turn in range(len(prompts)):
            sample = self.processor(frames, prompts[: turn + 1], answers)
            input_ids = sample["input_ids"].unsqueeze(0).to(device)
            generated = self.mllm.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=sample["pixel_values"].to(device, self.mllm.dtype),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            new_tokens = generated[0, input_ids.shape[1] :]
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=False)
            answers.append(text.split(suffix)[0])
        return self.processor(frames, prompts, answers), answers
