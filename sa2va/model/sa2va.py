"""The joint model: InternVL -> hidden state at [SEG] -> projector -> SAM2 prompt -> mask.

Training uses teacher forcing (the answer, e.g. "Sure, [SEG].", is in `input_ids` and
`labels`), so gradients reach the LLM, the projector and SAM2. Predicting through
`generate` would give none (transformers runs it under `torch.no_grad`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import LogitsProcessorList

from sa2va.model.feature_cache import FeatureCache, cached_encoders
from sa2va.model.lora import lora_settings
from sa2va.model.mllm import SEG_TOKEN, build_mllm, image_embeddings
from sa2va.model.official import is_sa2va_release, load_release_heads, release_has_sam2
from sa2va.model.processor import Sa2VAProcessor
from sa2va.model.protocol import (
    DEFAULT_ANSWER,
    ClipPredictor,
    SegmentationOutput,
    batch_to_device,
    model_device,
    per_sample,
)
from sa2va.model.sam2 import TemporalFn, build_sam2, upsample
from sa2va.model.temporal import build_temporal, windowed
from sa2va.utils import to_plain


def build_projector(in_dim: int, out_dim: int, hidden_dim: int | None = None, dropout: float = 0.0):
    """`text_hidden_fcs` of the official model: Linear(D,D)-ReLU-Linear(D,out)-Dropout."""
    hidden_dim = hidden_dim or in_dim
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
        nn.Dropout(dropout),
    )


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


class Sa2VA(ClipPredictor, nn.Module):
    """InternVL + SAM2 joined by the `[SEG]` token; built from plain config mappings.

    Implements the segmentation-model protocol (:mod:`sa2va.model.protocol`): `config` is
    kept verbatim so an export can rebuild the same architecture without any pretrained file
    (`load_pretrained=False`), then load only the trained weights.
    """

    oracle_prompt: ClassVar[bool] = False  # prompted by its own [SEG] token

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
        lora: Mapping[str, Any] | None = None,
        temporal: str = "none",
        temporal_window: int = 1,
        load_pretrained: bool = True,
        name: str = "sa2va",
    ) -> None:
        super().__init__()
        mllm, sam2, projector = to_plain(mllm), to_plain(sam2), to_plain(projector)
        init_from_sa2va = to_plain(init_from_sa2va)
        lora_spec = lora_settings(to_plain(lora))
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
                "lora": asdict(lora_spec) if lora_spec else None,
                "temporal": temporal,
                "temporal_window": temporal_window,
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
        # on SAM2's last-level image features, between its encoder and mask decoder
        self.temporal = build_temporal(temporal, self.sam2.sam_prompt_encoder.embed_dim)
        self.temporal_window = temporal_window  # frames per training clip: inference windows
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
        if lora_spec is not None:  # after every pretrained load: their keys have no adapters
            self.add_lora(lora_spec.peft_config())

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
            self.config["lora"] = None  # the architecture now has no adapters

    # ---- forward pieces -------------------------------------------------------------
    def _mllm_hidden(
        self, batch: Mapping[str, Any], vision: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[Tensor | None, Tensor]:
        """LM loss (with `labels`) and last-layer states (B, L, D); ``vision`` stands in for
        the vision tower.

        Without labels nothing reads vocabulary logits: the output layer scores no position
        (an empty `logits_to_keep`).
        """
        labels = batch.get("labels")
        keep = 0 if labels is not None else torch.empty(0, dtype=torch.long)
        pixel_values = batch["pixel_values"].to(self.mllm.dtype)
        inputs: dict[str, Tensor] = {"input_ids": batch["input_ids"]}
        if vision is None:
            inputs["pixel_values"] = pixel_values
        else:  # what InternVL's forward does with pixel_values, around the stand-in tower
            embeds = self.mllm.get_input_embeddings()(batch["input_ids"])
            image = image_embeddings(self.mllm, vision(pixel_values)).to(embeds.dtype)
            mask = self.mllm.model.get_placeholder_mask(
                batch["input_ids"], inputs_embeds=embeds, image_features=image
            )
            inputs = {"inputs_embeds": embeds.masked_scatter(mask, image)}
        out = self.mllm(
            **inputs,
            attention_mask=batch["attention_mask"],
            labels=labels,
            logits_to_keep=keep,
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
        self,
        frames: Sequence[Tensor],
        embeddings: Tensor,
        counts: Sequence[int],
        encode: Callable[[Tensor], dict[str, Any]] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Masks for each sample: every [SEG] embedding of a sample prompts all its frames.

        SAM2 is prompted the official way (:class:`~sa2va.model.sam2.LanguagePromptedSAM2`).
        Returns per sample (T, M, S, S) logits at ``mask_size``, upsampled once (bilinear)
        straight from the low-resolution logits, and those (T, M, s, s) low-resolution
        logits (SAM2 image_size/4), on which the official loss is computed. ``encode`` stands
        in for SAM2's image encoder (:mod:`sa2va.model.feature_cache`).
        """
        lengths = [f.shape[0] for f in frames]
        images = torch.cat(list(frames)).to(self.text_hidden_fcs[0].weight.dtype)
        if not sum(counts):  # no [SEG] generated: no masks, and nothing to decode
            size, low = self.processor.mask_size, self.sam2.image_size // 4
            return (
                [images.new_zeros(t_len, 0, size, size) for t_len in lengths],
                [images.new_zeros(t_len, 0, low, low) for t_len in lengths],
            )
        features = self.sam2.image_features(images, encode, self.temporal_fn(lengths))
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
        return per_sample(logits, lengths, counts), per_sample(low_res, lengths, counts)

    def temporal_fn(self, lengths: Sequence[int], overlap: int | None = None) -> TemporalFn | None:
        """The temporal module over the (N, C, h, w) features of clips of ``lengths`` frames.

        A clip longer than the training clip (``temporal_window``) is processed in windows of
        that length, consecutive windows sharing ``overlap`` frames (None: half a window),
        whose outputs are averaged; a training clip is one window.
        """
        if self.temporal is None:
            return None
        temporal, window = self.temporal, self.temporal_window
        overlap = window // 2 if overlap is None else overlap

        def clip(x: Tensor) -> Tensor:
            return temporal(x, [x.shape[0]])

        def run(features: Tensor) -> Tensor:
            parts = features.split(list(lengths))
            return torch.cat([windowed(clip, part, window, overlap) for part in parts])

        return run

    def seg_embeddings(
        self, batch: Mapping[str, Any], vision: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[Tensor | None, Tensor, list[int]]:
        """The language half of `forward`: LM loss, projected [SEG] embeddings, counts per sample.

        Video propagation (`sa2va.video`) prompts SAM2's memory tracker with these itself.
        ``vision`` stands in for the vision tower (:mod:`sa2va.model.feature_cache`).
        """
        lm_loss, hidden = self._mllm_hidden(batch, vision)
        embeddings, counts = self._seg_embeddings(hidden, batch["input_ids"])
        return lm_loss, embeddings, counts

    def forward(self, batch: Mapping[str, Any]) -> SegmentationOutput:
        cached = cached_encoders(self, batch)  # frozen encoders reuse per-frame outputs
        lm_loss, embeddings, counts = self.seg_embeddings(batch, cached.vision)
        masks, low_res = self.decode(batch["g_pixel_values"], embeddings, counts, cached.sam2)
        return SegmentationOutput(
            pred_masks=masks, seg_counts=counts, lm_loss=lm_loss, low_res_masks=low_res
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
        logits_processor: LogitsProcessorList | None = None,
    ) -> dict[str, Any]:
        """Answer text and mask logits (T, M, H, W) for one clip.

        `fast` appends the fixed `answer` and runs one forward pass; `generate` decodes
        the answer autoregressively and reads the [SEG] states from that same pass, as the
        official model does (see :meth:`generate_seg_embeddings`). Both give the same masks
        whenever the generated answer equals `answer`, up to KV-cache rounding (float32:
        states within ~1e-6). `logits_processor` steers generation (e.g. a forced answer).
        """
        if mode == "generate":
            texts, embeddings = self.generate_seg_embeddings(
                frames, prompts, max_new_tokens, logits_processor
            )
            device = embeddings.device
            views = torch.stack([self.processor.sam2_view(f) for f in frames]).to(device)
            masks, _ = self.decode([views], embeddings, [embeddings.shape[0]])
            return {"text": texts, "masks": masks[0], "seg_count": embeddings.shape[0]}
        return super().predict_forward(frames, prompts, mode, answer, max_new_tokens)

    @torch.no_grad()
    def prepare_inputs(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        mode: str = "fast",
        answer: str = DEFAULT_ANSWER,
        max_new_tokens: int = 32,
    ) -> tuple[dict[str, Any], list[str]]:
        """One clip as an on-device batch without labels, plus its answer texts (`fast`:
        `answer` for every prompt; `generate`: the decoded answers)."""
        if mode not in ("fast", "generate"):
            raise ValueError(f"predict mode must be 'fast' or 'generate', got {mode!r}")
        if mode == "fast":
            texts = [answer] * len(prompts)
        else:
            texts, _ = self.generate_seg_embeddings(frames, prompts, max_new_tokens)
        sample = self.processor(frames, prompts, texts)
        batch = batch_to_device(self.processor.collate([sample]), model_device(self))
        batch.pop("labels")
        return batch, texts

    def save_pretrained_files(self, folder: Path) -> None:
        """InternVL's config, the tokenizer and the image processor: what a rebuild with
        ``load_pretrained=False`` reads from ``model.mllm.path``."""
        self.mllm.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.processor.image_processor.save_pretrained(folder)

    @torch.no_grad()
    def generate_seg_embeddings(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        logits_processor: LogitsProcessorList | None = None,
    ) -> tuple[list[str], Tensor]:
        """Each turn's answer, generated in order (earlier answers fed back as history), and
        the projected [SEG] embeddings (M, C) in reading order, all from generation itself.

        The last turn's generation returns its last-layer states: its prefill covers every
        earlier turn (prompts and answers, as `fast` reads them) and each decoding step the
        token it was fed, so the LLM runs once per new token and never again over the whole
        sequence. Only the newest token is never fed back; when the kept answer ends in
        [SEG] one more cached step reads its state.
        """
        answers: list[str] = []
        for turn in range(len(prompts)):
            last = turn == len(prompts) - 1
            text, generation, prompt_length = self._generate_turn(
                frames, prompts[: turn + 1], answers, max_new_tokens, logits_processor, last
            )
            answers.append(text)
        states = torch.cat([step[-1][0] for step in generation.hidden_states])
        sequence = generation.sequences[0]
        positions = torch.nonzero(sequence == self.seg_token_id).flatten()
        # the prompt's [SEG]s, then the kept answer's (none from tokens after its end of turn)
        in_answer = positions >= prompt_length
        answer_positions = positions[in_answer][: text.count(SEG_TOKEN)]
        positions = torch.cat([positions[~in_answer], answer_positions])
        if positions.numel() and int(positions[-1]) == states.shape[0]:
            states = torch.cat([states, self._next_state(sequence[-1:], generation)])
        return answers, self.text_hidden_fcs(states[positions])

    def _generate_turn(
        self,
        frames: Sequence[Image.Image],
        prompts: Sequence[str],
        answers: Sequence[str],
        max_new_tokens: int,
        logits_processor: LogitsProcessorList | None,
        with_states: bool,
    ) -> tuple[str, Any, int]:
        """Greedy answer to the last of `prompts` (text up to the end of turn), the generation
        output (last-layer states per step with `with_states`) and the prompt's length.

        Generation computes vocabulary logits for the newest position only (transformers
        passes ``logits_to_keep=1``), never over the prompt.
        """
        sample = self.processor(frames, prompts, answers)
        input_ids = sample["input_ids"].unsqueeze(0).to(model_device(self))
        generation = self.mllm.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=sample["pixel_values"].to(model_device(self), self.mllm.dtype),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=logits_processor,
            output_hidden_states=with_states,
            return_dict_in_generate=True,
        )
        new_tokens = generation.sequences[0, input_ids.shape[1] :]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=False)
        return text.split(self.processor.template.suffix)[0], generation, input_ids.shape[1]

    def _next_state(self, token: Tensor, generation: Any) -> Tensor:
        """Last-layer state (1, D) of the final generated token: one cached LLM step."""
        out = self.language_model(
            input_ids=token.unsqueeze(0), past_key_values=generation.past_key_values
        )
        return out.last_hidden_state[0]
