"""The joint model: inputs, [SEG] wiring, both predict modes, checkpoint round trip."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.batches import synthetic_batch
from hydra.utils import instantiate
from PIL import Image

from sa2va.benchmarks.generation import forced_answer
from sa2va.model.mllm import CHAT_TEMPLATES, IMG_CONTEXT_TOKEN, build_tiny_tokenizer
from sa2va.model.processor import IGNORE_INDEX, Sa2VAProcessor
from sa2va.model.sa2va import Sa2VA
from sa2va.training.module import Sa2VAModule

PROMPT = "<image>\nPlease segment the blood vessel."


@pytest.fixture
def model(compose_cfg) -> Sa2VA:
    torch.manual_seed(0)
    return instantiate(compose_cfg().model)


def frames(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)) for _ in range(n)]


def test_processor_supervises_only_the_answers_and_expands_image_tokens(model):
    sample = model.processor(
        frames(2), [PROMPT, "Please segment the artery."], ["Sure, [SEG]."] * 2
    )
    tok = model.tokenizer
    ids, labels = sample["input_ids"], sample["labels"]
    supervised = tok.decode(ids[labels != IGNORE_INDEX])
    # as the official encoding: the end-of-turn token is supervised, the `\n` after it not
    assert supervised == "Sure, [SEG].<|im_end|>Sure, [SEG].<|im_end|>"
    context_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    # two frames, one tile each, image_seq_length tokens per tile
    assert (ids == context_id).sum() == 2 * model.processor.image_seq_length
    assert sample["pixel_values"].shape[0] == 2
    assert sample["g_pixel_values"].shape == (2, 3, 256, 256)


def test_prompt_text_follows_the_official_template(model):
    """Frames' `<img>` blocks joined by `\n` (no `FrameN:`), qwen_chat turns, an open
    assistant turn for generation, no BOS for this tokenizer."""
    sample = model.processor(frames(2), ["<image>Please segment the artery."], None)
    image = "<img>" + IMG_CONTEXT_TOKEN * model.processor.image_seq_length + "</img>"
    assert model.tokenizer.decode(sample["input_ids"]) == (
        f"<|im_start|>user\n{image}\n{image}Please segment the artery.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert (sample["labels"] == IGNORE_INDEX).all()


def test_phi3_template_and_a_bos_tokenizer_as_the_official_code(model):
    """Sa2VA-4B's phi3_chat turns; a tokenizer with a BOS (InternLM2) starts the
    conversation with it once, unsupervised (xtuner: no BOS after a suffix-as-EOS turn)."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    processor = Sa2VAProcessor(
        tokenizer=tokenizer,
        image_processor=model.processor.image_processor,
        image_seq_length=1,
        sam2_image_size=64,
        template=CHAT_TEMPLATES["phi3_chat"],
    )
    sample = processor(frames(1), ["<image>A?", "B?"], ["Sure, [SEG].", "No."])
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids[0] == tokenizer.bos_token_id and (ids == tokenizer.bos_token_id).sum() == 1
    assert tokenizer.decode(ids[1:]) == (
        "<|user|>\n<img><IMG_CONTEXT></img>A?<|end|>\n<|assistant|>\nSure, [SEG].<|end|>\n"
        "<|user|>\nB?<|end|>\n<|assistant|>\nNo.<|end|>\n"
    )
    assert tokenizer.decode(ids[labels != IGNORE_INDEX]) == "Sure, [SEG].<|end|>No.<|end|>"


def test_vocabulary_has_the_official_special_tokens_in_order(model):
    tok = model.tokenizer
    ids = tok.convert_tokens_to_ids(["[SEG]", "<p>", "</p>", "<vp>", "</vp>"])
    assert ids == list(range(len(tok) - 5, len(tok)))
    assert model.mllm.get_input_embeddings().num_embeddings == len(tok)
    assert model.mllm.lm_head.weight.shape[0] == len(tok)


def test_key_frames_bound_the_image_tokens(model):
    sample = model.processor(frames(9), [PROMPT], ["Sure, [SEG]."])
    assert sample["pixel_values"].shape[0] == model.processor.mllm_frames == 5
    assert sample["g_pixel_values"].shape[0] == 9  # SAM2 still sees every frame


def test_forward_gives_one_mask_per_seg_per_frame(model):
    clip = model.processor(frames(3), [PROMPT], ["Sure, [SEG]."])
    two_objects = model.processor(
        frames(1), [PROMPT, "Please segment the artery."], ["Sure, [SEG].", "Sure, [SEG]."]
    )
    out = model(model.processor.collate([clip, two_objects]))
    assert out.seg_counts == [1, 2]
    assert [tuple(m.shape) for m in out.pred_masks] == [(3, 1, 256, 256), (1, 2, 256, 256)]
    assert out.lm_loss is not None and torch.isfinite(out.lm_loss)


def test_masks_are_the_best_of_three_upsampled_once_from_sam2_low_res(compose_cfg):
    torch.manual_seed(0)
    model = instantiate(compose_cfg("model.mask_size=96").model).eval()
    batch = model.processor.collate([model.processor(frames(2), [PROMPT], ["Sure, [SEG]."])])
    out = model(batch)
    low_res = out.low_res_masks[0]
    assert low_res.shape == (2, 1, model.sam2.image_size // 4, model.sam2.image_size // 4)
    once = F.interpolate(low_res, (96, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.pred_masks[0], once)
    # the official prompt: 2 not_a_point tokens + [SEG], and the mask SAM2 rates best
    _, embeddings, _ = model.seg_embeddings(batch)
    features = model.sam2.image_features(batch["g_pixel_values"][0])
    decoded = model.sam2.decode_language(features, embeddings.expand(2, -1)).masks
    assert decoded.sparse_embeddings.shape[1] == 3 and decoded.ious.shape[1] == 3
    best = decoded.low_res_multimasks[torch.arange(2), decoded.ious.argmax(-1)]
    torch.testing.assert_close(low_res[:, 0], best)


def test_same_seg_embedding_prompts_every_frame_of_a_clip(model):
    """A clip of one frame repeated gives the same mask on each frame."""
    clip = frames(1) * 3
    out = model.predict_forward(clip, [PROMPT])
    masks = out["masks"]
    assert torch.allclose(masks[0], masks[1], atol=1e-5)
    assert torch.allclose(masks[0], masks[2], atol=1e-5)


def test_gradients_reach_llm_projector_and_sam2(model):
    batch = synthetic_batch(model)
    out = model(batch)
    loss = sum(m.float().mean() for m in out.pred_masks)
    loss.backward()
    for part in (
        model.mllm.model.language_model,
        model.text_hidden_fcs,
        model.sam2.sam_mask_decoder,
    ):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), type(part).__name__


# generate reads the [SEG] states from its KV-cached decoding steps, fast from one pass over
# the whole sequence: float32 rounding differs by ~1e-6 in the states
GENERATE_ATOL = 1e-4


def test_fast_and_generate_agree_once_the_answer_is_learned(model):
    """Teach the LM the fixed answer, then both predict modes must give the same masks."""
    batch = synthetic_batch(model)
    optimizer = torch.optim.AdamW(model.mllm.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        model(batch).lm_loss.backward()
        optimizer.step()
    model.eval()
    clip = frames(1)
    generated = model.predict_forward(clip, [PROMPT], mode="generate", max_new_tokens=12)
    fast = model.predict_forward(clip, [PROMPT], mode="fast")
    assert generated["text"] == ["Sure, [SEG]."]
    torch.testing.assert_close(generated["masks"], fast["masks"], rtol=0, atol=GENERATE_ATOL)


class LLMCalls:
    """Counts language-model calls and the positions the vocabulary layer scores."""

    def __init__(self, model: Sa2VA) -> None:
        self.calls: list[int] = []  # tokens fed per LLM call
        self.scored: list[int] = []  # positions per output-layer call
        self.vision = 0
        model.language_model.register_forward_pre_hook(self._llm, with_kwargs=True)
        model.mllm.lm_head.register_forward_pre_hook(lambda m, a: self.scored.append(a[0].shape[1]))
        model.mllm.model.vision_tower.register_forward_pre_hook(self._vision)

    def _llm(self, module, args, kwargs) -> None:
        embeds = kwargs.get("inputs_embeds")
        self.calls.append((embeds if embeds is not None else kwargs["input_ids"]).shape[1])

    def _vision(self, module, args) -> None:
        self.vision += 1


def test_generate_runs_the_llm_once_per_new_token_and_scores_no_prompt(model):
    """No second pass: one prefill (which yields the first token), then one call per further
    token; vocabulary logits only for the newest position."""
    model.eval()
    calls = LLMCalls(model)
    answer = "Sure, [SEG].<|im_end|>"
    forced = forced_answer(model.tokenizer, answer)
    out = model.predict_forward(
        frames(1), [PROMPT], mode="generate", max_new_tokens=12, logits_processor=forced
    )
    new_tokens = len(model.tokenizer(answer, add_special_tokens=False)["input_ids"])
    assert out["text"] == ["Sure, [SEG]."] and out["seg_count"] == 1
    assert len(calls.calls) == new_tokens and calls.calls[1:] == [1] * (new_tokens - 1)
    assert calls.scored == [1] * new_tokens and calls.vision == 1


def test_fast_computes_no_vocabulary_logits(model):
    model.eval()
    calls = LLMCalls(model)
    out = model.predict_forward(frames(2), [PROMPT], mode="fast")
    assert out["seg_count"] == 1 and len(calls.calls) == 1 and calls.scored == [0]


def test_a_seg_written_last_is_read_from_one_more_cached_step(model):
    """Cut off right after [SEG]: its state was never fed back, so one extra step reads it;
    the masks equal fast's with the same answer (a state depends only on earlier tokens)."""
    model.eval()
    calls = LLMCalls(model)
    forced = forced_answer(model.tokenizer, "Sure, [SEG]")
    new_tokens = len(model.tokenizer("Sure, [SEG]", add_special_tokens=False)["input_ids"])
    clip = frames(1)
    out = model.predict_forward(
        clip, [PROMPT], mode="generate", max_new_tokens=new_tokens, logits_processor=forced
    )
    assert out["text"] == ["Sure, [SEG]"] and len(calls.calls) == new_tokens + 1
    fast = model.predict_forward(clip, [PROMPT], mode="fast", answer="Sure, [SEG]")
    torch.testing.assert_close(out["masks"], fast["masks"], rtol=0, atol=GENERATE_ATOL)


def test_generate_of_two_turns_matches_fast(model, monkeypatch):
    """The last turn's prefill covers the first turn's [SEG]; its decoding the second's."""
    model.eval()
    answers = ["Sure, [SEG].", "It is [SEG]."]
    prompts = [PROMPT, "And the optic disc?"]
    turns = iter(answers)
    generate = model.mllm.generate

    def forced_turn(**kwargs):  # each turn writes its own answer
        forced = forced_answer(model.tokenizer, next(turns) + "<|im_end|>")
        return generate(**{**kwargs, "logits_processor": forced})

    monkeypatch.setattr(model.mllm, "generate", forced_turn)
    clip = frames(2)
    texts, embeddings = model.generate_seg_embeddings(clip, prompts)
    batch = model.processor.collate([model.processor(clip, prompts, answers)])
    batch.pop("labels")
    _, reference, counts = model.seg_embeddings(batch)
    assert texts == answers and counts == [2]
    torch.testing.assert_close(embeddings, reference, rtol=0, atol=GENERATE_ATOL)


def test_generate_without_seg_gives_no_mask(model):
    forced = forced_answer(model.tokenizer, "There is no vessel.<|im_end|>")
    out = model.predict_forward(frames(2), [PROMPT], mode="generate", logits_processor=forced)
    assert out["text"] == ["There is no vessel."]
    assert out["seg_count"] == 0 and out["masks"].shape == (2, 0, 256, 256)


def test_unknown_predict_mode_is_rejected(model):
    with pytest.raises(ValueError, match="'fast' or 'generate'"):
        model.predict_forward(frames(1), [PROMPT], mode="beam")


def test_checkpoint_round_trip_gives_identical_predictions(compose_cfg, tmp_path):
    cfg = compose_cfg("freeze=official")
    module = instantiate(
        cfg.module,
        model=instantiate(cfg.model),
        loss=instantiate(cfg.loss),
        freeze=instantiate(cfg.freeze),
        optim=instantiate(cfg.optim),
    )
    with torch.no_grad():  # move away from initialisation so the test can fail
        for p in module.model.text_hidden_fcs.parameters():
            p.add_(0.1)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = torch.load(path, weights_only=False)
    meta = checkpoint["sa2va"]
    rebuilt = Sa2VA(**meta["model"], load_pretrained=False)
    instantiate({"_target_": "sa2va.training.freeze.FreezePolicy", **meta["freeze"]}).apply(rebuilt)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    rebuilt.load_state_dict({k: v for k, v in state.items() if not k.startswith("loss.")})
    module.model.eval(), rebuilt.eval()
    clip = frames(2)
    expected = module.model.predict_forward(clip, [PROMPT])["masks"]
    assert torch.equal(rebuilt.predict_forward(clip, [PROMPT])["masks"], expected)
    assert isinstance(module, Sa2VAModule)
