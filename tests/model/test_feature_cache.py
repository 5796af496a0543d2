"""Frozen-encoder feature cache: exact training, automatic bypass, invalidation, budget, disk."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers.configs import FAST_DATA
from torch import nn

from sa2va.model.feature_cache import FeatureCache, cacheable
from sa2va.training.run import build


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors on a shared CPU: extra intra-op threads only wait for busy cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def two_epochs(cfg) -> tuple[list[float], torch.nn.Module]:
    """Per-step losses of two epochs of plain training (same seed -> same batches)."""
    L.seed_everything(0)
    module, datamodule = build(cfg)
    datamodule.setup("fit")
    optimizer, _ = module.optim.build(module.model.named_parameters(), total_steps=100)
    losses = []
    for _ in range(2):
        for batch in datamodule.train_dataloader():
            optimizer.zero_grad()
            loss = module._losses(batch)[0]["loss"]
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, module.model


def test_cached_training_gives_identical_losses_and_reuses_every_frame(compose_cfg):
    """Official policy: vision tower and SAM2 encoder frozen, SAM2 mask decoder training;
    unaugmented frames (the cache turns itself off for augmented ones)."""
    plain_losses, plain = two_epochs(compose_cfg(*FAST_DATA, "freeze=official", "augment=none"))
    cached_losses, cached = two_epochs(
        compose_cfg(*FAST_DATA, "freeze=official", "augment=none", "+module.feature_cache=true")
    )
    assert plain.feature_cache is None
    assert cached_losses == plain_losses  # bitwise: same numbers, same order
    cache = cached.feature_cache
    assert cache.stats["misses"] == cache.stats["hits"] == len(cache) > 0  # epoch 2 all hits
    # conv_s0/conv_s1 run after the cache: the decoder trained through cached features
    for conv in ("conv_s0", "conv_s1"):
        after = getattr(cached.sam2.sam_mask_decoder, conv).weight
        assert torch.equal(after, getattr(plain.sam2.sam_mask_decoder, conv).weight)
        assert after.grad is not None and after.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides",
    [
        ["freeze=full", "augment=none"],
        ["freeze=official", "augment=none", "data.hflip_prob=0.5"],
        ["freeze=official", "augment=light"],
    ],
    ids=["encoders-train", "flip-on", "augment-light"],
)
def test_cache_stays_empty_when_outputs_are_not_reusable(compose_cfg, overrides):
    cfg = compose_cfg(*FAST_DATA, *overrides, "+module.feature_cache=true")
    module, datamodule = build(cfg)
    datamodule.setup("fit")
    module._losses(next(iter(datamodule.train_dataloader())))
    assert len(module.model.feature_cache) == 0 and not module.model.feature_cache.stats


def test_changed_encoder_weights_drop_stale_entries(compose_cfg):
    module, datamodule = build(compose_cfg(*FAST_DATA, "freeze=official"))
    datamodule.setup("fit")
    model = module.model.eval()
    batch = next(iter(datamodule.train_dataloader()))
    model.feature_cache = FeatureCache()
    with torch.no_grad():
        model(batch)
        for p in model.sam2.image_encoder.parameters():
            p.mul_(1.5)
        cached = model(batch).pred_masks
        model.feature_cache = None
        fresh = model(batch).pred_masks
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh, strict=True))


class Doubler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0), requires_grad=False)
        self.calls = 0

    def rows(self, inputs: torch.Tensor):
        def compute(index: torch.Tensor) -> list[torch.Tensor]:
            self.calls += 1
            return [inputs[index] * self.scale]

        return compute


def test_byte_budget_evicts_the_least_recently_used_entry():
    encoder = Doubler()
    row_bytes = 4 * 4  # four float32 values per row
    cache = FeatureCache(max_gb=2.5 * row_bytes / 2**30)  # room for two rows
    cache.bind("enc", encoder)
    x = torch.arange(12.0).view(3, 4)
    cache.rows("enc", ["a", "b"], encoder.rows(x[:2]), x.device)
    cache.rows("enc", ["a"], encoder.rows(x[:1]), x.device)  # "a" is now the most recent
    cache.rows("enc", ["c"], encoder.rows(x[2:]), x.device)  # evicts "b"
    assert len(cache) == 2 and cache.nbytes == 2 * row_bytes and cache.stats["evictions"] == 1
    calls = encoder.calls
    cache.rows("enc", ["a", "c"], encoder.rows(x[[0, 2]]), x.device)
    assert encoder.calls == calls  # both still cached


def test_disk_entries_are_reused_by_a_new_cache_until_the_weights_change(tmp_path):
    encoder = Doubler()
    x = torch.arange(8.0).view(2, 4)
    first = FeatureCache(disk_dir=str(tmp_path))
    first.bind("enc", encoder)
    (expected,) = first.rows("enc", ["a", "b"], encoder.rows(x), x.device)
    second = FeatureCache(disk_dir=str(tmp_path))
    second.bind("enc", encoder)
    (loaded,) = second.rows("enc", ["a", "b"], encoder.rows(x), x.device)
    assert torch.equal(loaded, expected) and second.stats["disk_hits"] == 2
    assert encoder.calls == 1
    with torch.no_grad():
        encoder.scale.fill_(3.0)
    third = FeatureCache(disk_dir=str(tmp_path))
    third.bind("enc", encoder)
    (recomputed,) = third.rows("enc", ["a", "b"], encoder.rows(x), x.device)
    assert torch.equal(recomputed, 3 * x) and third.stats["disk_hits"] == 0


def test_random_layers_make_an_encoder_uncacheable_only_while_training():
    encoder = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)).requires_grad_(False)
    assert not cacheable(encoder.train())
    assert cacheable(encoder.eval())
    assert not cacheable(encoder.requires_grad_(True))
