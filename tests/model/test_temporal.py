"""Temporal modules: identity at initialisation, they train, and they mix only the frames of
one clip; the joint model wires them between SAM2's encoder and mask decoder."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from sa2va.model.temporal import build_temporal, window_starts, windowed

DESIGNS = ("adapter", "attention", "tra")
C, H, W = 64, 4, 4


def _trained_copy(kind: str, steps: int = 3):
    """A module after a few SGD steps on a target that needs frames mixed (each frame's
    target is its previous frame), and the parameters before training."""
    torch.manual_seed(0)
    module = build_temporal(kind, C)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    x = torch.randn(4, C, H, W)
    target = x.roll(1, dims=0)
    optim = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(steps):
        optim.zero_grad()
        torch.nn.functional.mse_loss(module(x, [4]), target).backward()
        optim.step()
    return module, before


@pytest.mark.parametrize("kind", DESIGNS)
def test_identity_at_initialisation(kind):
    torch.manual_seed(0)
    module = build_temporal(kind, C)
    x = torch.randn(6, C, H, W)
    assert torch.equal(module(x, [4, 2]), x)


@pytest.mark.parametrize("kind", DESIGNS)
def test_trains_and_stops_being_the_identity(kind):
    module, before = _trained_copy(kind)
    changed = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    assert changed  # some parameter got a gradient and moved
    x = torch.randn(4, C, H, W)
    assert not torch.allclose(module(x, [4]), x)


@pytest.mark.parametrize("kind", DESIGNS)
def test_output_depends_only_on_frames_of_the_same_clip(kind):
    module, _ = _trained_copy(kind)
    torch.manual_seed(1)
    clip_a, clip_b, clip_c = (
        torch.randn(3, C, H, W),
        torch.randn(3, C, H, W),
        torch.randn(2, C, H, W),
    )
    out = module(torch.cat([clip_a, clip_b, clip_c]), [3, 3, 2])
    # other clips permuted / replaced: clip A's output is unchanged, to the bit
    swapped = module(torch.cat([clip_a, clip_c, torch.randn(3, C, H, W)]), [3, 2, 3])
    torch.testing.assert_close(swapped[:3], out[:3], rtol=0, atol=0)
    # the middle frame of the clip changed: its neighbours' outputs change too
    edited = clip_a.clone()
    edited[1] += 1.0
    out_edited = module(torch.cat([edited, clip_b, clip_c]), [3, 3, 2])
    assert not torch.equal(out_edited[0], out[0])
    assert not torch.equal(out_edited[2], out[2])
    torch.testing.assert_close(out_edited[3:], out[3:], rtol=0, atol=0)


def test_unknown_design_is_refused():
    with pytest.raises(ValueError, match="model.temporal must be one of"):
        build_temporal("lstm", C)
    assert build_temporal("none", C) is None


def test_windows_cover_the_video_and_overlaps_are_averaged():
    assert window_starts(8, 4, 2) == [0, 2, 4]
    assert window_starts(7, 4, 1) == [0, 3]
    assert window_starts(9, 4, 0) == [0, 4, 5]
    assert window_starts(3, 4, 2) == [0]
    with pytest.raises(ValueError):
        window_starts(8, 4, 4)
    # fn adds each window's first frame index: frames in two windows get the mean of both
    x = torch.zeros(6, 1)
    calls = []

    def fn(window):
        calls.append(window.shape[0])
        return window + len(calls)

    out = windowed(fn, x, window=4, overlap=2)  # windows [0, 4), [2, 6)
    assert calls == [4, 4]
    assert out[:, 0].tolist() == [1.0, 1.0, 1.5, 1.5, 2.0, 2.0]


@pytest.fixture
def tiny(compose_cfg):
    def build(*overrides: str):
        torch.manual_seed(0)
        return instantiate(compose_cfg(*overrides).model).eval()

    return build


def _clip(n: int, seed: int = 0) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray((torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy())
        for _ in range(n)
    ]


def _masks(model, clips):
    prompt, answer = ["<image>\nPlease segment the blood vessel."], ["Sure, [SEG]."]
    batch = model.processor.collate([model.processor(c, prompt, answer) for c in clips])
    return model(batch).pred_masks


@pytest.mark.parametrize("kind", DESIGNS)
def test_joint_model_is_unchanged_at_init_and_keeps_videos_apart(tiny, kind):
    plain = tiny()
    model = tiny(f"model.temporal={kind}", "data.clip_len=3")
    assert model.temporal_window == 3
    model.load_state_dict(plain.state_dict(), strict=False)  # same pretrained weights
    clips = [_clip(3, 0), _clip(3, 1)]
    with torch.no_grad():
        for a, b in zip(_masks(model, clips), _masks(plain, clips), strict=True):
            torch.testing.assert_close(a, b)
        for p in model.temporal.parameters():  # a trained (non-zero) residual branch
            p.add_(0.05 * torch.randn_like(p))
        first = _masks(model, clips)[0]
        other_video_changed = _masks(model, [clips[0], _clip(3, 2)])[0]
    torch.testing.assert_close(other_video_changed, first)
    assert not torch.allclose(first, _masks(plain, clips)[0])


def test_parameter_table_lists_the_temporal_module(tiny):
    from sa2va.training.freeze import parameter_table

    rows = {r["module"]: r for r in parameter_table(tiny("model.temporal=adapter"))}
    assert rows["temporal"]["total"] == sum(
        p.numel() for p in build_temporal("adapter", C).parameters()
    )
    assert "temporal" not in {r["module"] for r in parameter_table(tiny())}


@pytest.mark.parametrize(
    "freeze",
    ["official", "user_guide", "sam2_frozen", "sam2_decoder", "sam2_full", "full", "llm_last_n"],
)
def test_every_freezing_policy_trains_the_temporal_module(compose_cfg, freeze):
    last_n = ["freeze.llm_last_n=1"] if freeze == "llm_last_n" else []  # the tiny LLM: 2 layers
    cfg = compose_cfg(f"freeze={freeze}", "model.temporal=tra", *last_n)
    model = instantiate(cfg.model)
    instantiate(cfg.freeze).apply(model)
    assert all(p.requires_grad for p in model.temporal.parameters())
