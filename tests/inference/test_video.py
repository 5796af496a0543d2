"""Video inference on a random tiny model: per-frame batching, official SAM2 propagation.

Numerical parity of the propagation with the official code: tests/test_parity_sam2.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from sa2va.inference.video import probabilities, seg_owners, segment_video
from sa2va.model.sa2va import Sa2VA

PROMPTS = ["Please segment the blood vessel.", "Segment vessels [SEG] and optic disc [SEG]"]


@pytest.fixture
def model(compose_cfg) -> Sa2VA:
    torch.manual_seed(0)
    return instantiate(compose_cfg().model).eval()


def frames(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]


class CallLog:
    """Records each call of a wrapped method (with its keyword arguments) and forwards it."""

    def __init__(self, owner, name: str) -> None:
        self.calls: list[dict] = []
        self.method = getattr(owner, name)

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.method(*args, **kwargs)


def spy(monkeypatch, owner, name: str) -> CallLog:
    log = CallLog(owner, name)
    monkeypatch.setattr(owner, name, log)
    return log


def test_seg_owners_read_prompt_then_answer_of_each_turn():
    answers = ["Sure, [SEG].", "Done."]
    assert seg_owners(PROMPTS, answers) == [0, 1, 1]
    assert seg_owners(["a", "b"], ["[SEG] and [SEG]", "none"]) == [0, 0]


@pytest.mark.parametrize("video_mode", ["per_frame", "propagate"])
def test_one_mask_per_frame_per_seg(model, video_mode):
    pred = segment_video(model, frames(4), PROMPTS, video_mode=video_mode, batch_size=3)
    size = model.processor.mask_size
    assert [tuple(m.shape) for m in pred.logits] == [(4, size, size)] * 4  # 1 + 2 + 1 [SEG]
    assert pred.answers == [["Sure, [SEG].", "Sure, [SEG]."]] * 4
    assert all(torch.isfinite(m).all() for m in pred.logits)


def test_per_frame_batches_equal_single_frame_predictions(model, monkeypatch):
    clip = frames(5)
    mllm = spy(monkeypatch, model.mllm, "forward")
    pred = segment_video(model, clip, PROMPTS[:1], batch_size=2)
    assert len(mllm.calls) == math.ceil(5 / 2)
    for t, frame in enumerate(clip):
        alone = model.predict_forward([frame], PROMPTS[:1])["masks"][0]
        torch.testing.assert_close(pred.logits[t], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("key_frames", "shown"), [(None, 5), (2, 2)])
def test_propagate_shows_the_first_frames_to_the_mllm_once(model, monkeypatch, key_frames, shown):
    clip = frames(7)
    mllm = spy(monkeypatch, model.mllm, "forward")
    memory_attention = spy(monkeypatch, model.sam2.memory_attention, "forward")
    memory_encoder = spy(monkeypatch, model.sam2.memory_encoder, "forward")
    pred = segment_video(
        model, clip, PROMPTS[:1], video_mode="propagate", key_frames=key_frames, batch_size=2
    )
    assert len(mllm.calls) == 1
    first = model.processor(clip[:shown], PROMPTS[:1], ["Sure, [SEG]."])  # official: first N
    torch.testing.assert_close(mllm.calls[0]["pixel_values"], first["pixel_values"])
    assert len(memory_attention.calls) == 7 - shown  # conditioning frames have no memory
    assert len(memory_encoder.calls) == 7  # every frame adds to the memory bank
    size = model.sam2.image_size  # official: logits at SAM2's image size
    assert [tuple(m.shape) for m in pred.logits] == [(1, size, size)] * 7


def test_conditioning_frames_decode_as_trained_and_other_frames_use_memory(model):
    clip = frames(3)
    per_frame = segment_video(model, clip, PROMPTS[:1], video_mode="per_frame")
    propagated = segment_video(model, clip, PROMPTS[:1], video_mode="propagate", key_frames=1)
    torch.testing.assert_close(propagated.logits[0], per_frame.logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(propagated.logits[1], per_frame.logits[1], atol=1e-3)


def test_propagate_rejects_more_key_frames_than_the_mllm_sees(model):
    with pytest.raises(ValueError, match=r"key_frames must be in \[1, 5\]"):
        segment_video(model, frames(2), PROMPTS[:1], video_mode="propagate", key_frames=6)
    with pytest.raises(ValueError, match="memory_dtype must name a torch dtype"):
        segment_video(model, frames(2), PROMPTS[:1], video_mode="propagate", memory_dtype="bf")
    views = [model.processor.sam2_view(f) for f in frames(2)]
    prompts = torch.zeros(1, model.sam2.sam_prompt_encoder.embed_dim)
    with pytest.raises(ValueError, match=r"num_cond_frames must be in \[1, 2\]"):
        model.sam2.propagate(views, prompts, num_cond_frames=3)


def test_memories_are_stored_rounded_to_bfloat16_unless_asked_otherwise(model):
    clip = frames(3)
    outputs = {}
    for dtype in ("bfloat16", None):
        pred = segment_video(
            model, clip, PROMPTS[:1], video_mode="propagate", key_frames=1, memory_dtype=dtype
        )
        outputs[dtype] = pred.logits
    torch.testing.assert_close(outputs["bfloat16"][0], outputs[None][0])  # no memory used
    assert not torch.equal(outputs["bfloat16"][2], outputs[None][2])


def test_generate_mode_masks_follow_the_generated_answers(model):
    pred = segment_video(
        model, frames(3), PROMPTS[:1], mode="generate", video_mode="propagate", max_new_tokens=4
    )
    assert len(pred.logits) == 3 and len(pred.answers) == 3
    for logits, answers in zip(pred.logits, pred.answers, strict=True):
        assert logits.shape[0] == len(seg_owners(PROMPTS[:1], answers))


def test_probabilities_resize_to_the_image_size():
    logits = torch.tensor([[[-20.0, 20.0], [0.0, 0.0]]])
    probs = probabilities(logits, (4, 6))
    assert probs.shape == (1, 4, 6) and probs.min() >= 0 and probs.max() <= 1
    assert probs[0, 0, -1] > 0.99 and probs[0, 0, 0] < 0.01
    assert probabilities(logits[:0], (4, 6)).shape == (0, 4, 6)


def test_temporal_model_segments_windows_of_its_clip_length(compose_cfg):
    """per_frame: windows of the training clip (3 frames, overlap 1 by default: starts 0, 2),
    the shared frame 2 gets the mean of both windows' logits; propagate mixes all frames'
    features in the same windows, and a zero-initialised module changes nothing."""
    torch.manual_seed(0)
    temporal = instantiate(compose_cfg("model.temporal=tra", "data.clip_len=3").model).eval()
    torch.manual_seed(0)
    plain = instantiate(compose_cfg().model).eval()
    temporal.load_state_dict(plain.state_dict(), strict=False)
    clip, prompt = frames(5), PROMPTS[:1]
    before = segment_video(temporal, clip, prompt, video_mode="propagate").logits
    after = segment_video(plain, clip, prompt, video_mode="propagate").logits
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        for p in temporal.temporal.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pred = segment_video(temporal, clip, prompt, batch_size=8)
    windows = [
        segment_video(temporal, clip[s : s + 3], prompt, batch_size=8).logits for s in (0, 2)
    ]
    torch.testing.assert_close(pred.logits[0], windows[0][0])
    torch.testing.assert_close(pred.logits[2], (windows[0][2] + windows[1][0]) / 2)
    torch.testing.assert_close(pred.logits[4], windows[1][2])
    mixed = segment_video(temporal, clip, prompt, video_mode="propagate").logits
    assert not torch.allclose(mixed[0], before[0])
