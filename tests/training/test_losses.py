"""Loss terms against independent formulas and MONAI, on random inputs."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from monai.losses import DiceLoss

from sa2va.training.losses import Sa2VALoss, dice_loss, nearest_resize, point_sample


@pytest.fixture
def logits_target() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, 16, generator=gen) * 3
    target = torch.rand(3, 16, 16, generator=gen) > 0.7
    return logits, target


def test_bce_matches_seed_formula(logits_target):
    logits, target = logits_target
    p, y = logits.sigmoid().double(), target.double()
    reference = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    terms = Sa2VALoss().mask_terms(logits, target)
    assert terms["bce"].item() == pytest.approx(reference.item(), rel=1e-5)


def test_dice_matches_formula_and_monai(logits_target):
    logits, target = logits_target
    p, y = logits.sigmoid(), target.float()
    per_mask = [
        1 - (2 * (p[i] * y[i]).sum() + 1.0) / (p[i].sum() + y[i].sum() + 1.0) for i in range(len(p))
    ]
    reference = torch.stack(per_mask).mean()
    monai = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)(
        logits.unsqueeze(1), y.unsqueeze(1)
    )
    ours = dice_loss(logits, target, eps=1.0)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert ours.item() == pytest.approx(monai.item(), rel=1e-5)


def test_focal_matches_formula(logits_target):
    logits, target = logits_target
    gamma, alpha = 2.0, 0.25
    p, y = logits.sigmoid().double(), target.double()
    p_t = p * y + (1 - p) * (1 - y)
    alpha_t = alpha * y + (1 - alpha) * (1 - y)
    reference = (-alpha_t * (1 - p_t) ** gamma * p_t.log()).mean()
    loss = Sa2VALoss(weights={"focal": 1.0}, focal_gamma=gamma, focal_alpha=alpha)
    assert loss.mask_terms(logits, target)["focal"].item() == pytest.approx(
        reference.item(), rel=1e-4
    )


def test_cldice_is_zero_for_a_perfect_mask_and_high_for_a_wrong_one():
    target = torch.zeros(1, 32, 32, dtype=torch.bool)
    target[0, 14:18, 2:30] = True
    perfect = torch.where(target, 20.0, -20.0)
    loss = Sa2VALoss(weights={"cldice": 1.0})
    assert loss.mask_terms(perfect, target)["cldice"].item() < 0.05
    assert loss.mask_terms(-perfect, target)["cldice"].item() > 0.9


def test_weights_select_terms_and_total():
    logits = [torch.randn(1, 2, 8, 8, requires_grad=True)]
    target = [torch.rand(1, 2, 8, 8) > 0.5]
    lm = torch.tensor(2.0, requires_grad=True)
    terms = Sa2VALoss(weights={"bce": 1.0, "dice": 0.0, "lang": 0.5})(logits, target, lm)
    assert set(terms) == {"bce", "dice", "lang", "loss"}
    assert terms["loss"].item() == pytest.approx(terms["bce"].item() + 1.0)
    terms["loss"].backward()
    # Dice is logged but has weight 0: the gradient equals BCE's alone.
    bce_only = Sa2VALoss(weights={"bce": 1.0})
    grad = logits[0].grad.clone()
    logits[0].grad = None
    bce_only(logits, target, None)["loss"].backward()
    assert torch.allclose(grad, logits[0].grad)


def test_mismatched_mask_count_is_a_clear_error():
    with pytest.raises(ValueError, match="one \\[SEG\\] per object"):
        Sa2VALoss()([torch.zeros(1, 1, 8, 8)], [torch.zeros(1, 2, 8, 8)], None)


def test_point_sampling_reads_values_at_points_and_approximates_full_loss():
    grid = torch.arange(16.0).view(1, 4, 4)
    centre_of_pixel_1_2 = torch.tensor([[[(2 + 0.5) / 4, (1 + 0.5) / 4]]])
    assert point_sample(grid, centre_of_pixel_1_2).item() == pytest.approx(6.0)
    torch.manual_seed(0)
    logits = torch.randn(2, 32, 32)
    target = torch.rand(2, 32, 32) > 0.5
    full = Sa2VALoss().mask_terms(logits, target)["bce"]
    sampled = Sa2VALoss(num_points=4096, importance_sample_ratio=0.0).mask_terms(logits, target)
    assert sampled["bce"].item() == pytest.approx(full.item(), rel=0.1)


def test_low_res_mode_scores_sam2_low_res_logits_against_nearest_downsampled_truth():
    gen = torch.Generator().manual_seed(1)
    truth = [torch.rand(2, 1, 16, 16, generator=gen) > 0.5]
    low_res = [torch.randn(2, 1, 4, 4, generator=gen)]
    full_res = [torch.full((2, 1, 16, 16), 100.0)]  # ignored in low_res mode
    terms = Sa2VALoss(mask_resolution="low_res")(full_res, truth, None, low_res)
    # nearest by 4 keeps pixel (4i, 4j): an independent formula for the downsampled truth
    reference = Sa2VALoss().mask_terms(
        low_res[0].flatten(0, 1), truth[0][..., ::4, ::4].flatten(0, 1)
    )
    assert terms["bce"].item() == pytest.approx(reference["bce"].item(), rel=1e-6)
    assert terms["dice"].item() == pytest.approx(reference["dice"].item(), rel=1e-6)
    full = Sa2VALoss()(full_res, truth, None, low_res)  # the default keeps full resolution
    assert full["bce"].item() > 10 * terms["bce"].item()


def test_nearest_downsampling_erases_thin_vessels_so_the_user_loss_stays_full_res():
    vessel = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    vessel[..., 10:12, :] = True  # a 2 px horizontal vessel
    assert nearest_resize(vessel, (16, 16)).sum() == 0


def test_low_res_mode_needs_the_model_s_low_res_logits():
    masks = [torch.zeros(1, 1, 8, 8)]
    with pytest.raises(ValueError, match="needs SAM2's low-resolution logits"):
        Sa2VALoss(mask_resolution="low_res")(masks, masks, None, None)
    with pytest.raises(ValueError, match="mask_resolution must be one of"):
        Sa2VALoss(mask_resolution="half")


def test_official_loss_config_is_low_res_with_point_sampling(compose_cfg):
    official = instantiate(compose_cfg("loss=official").loss)
    assert (official.mask_resolution, official.num_points) == ("low_res", 12544)
    assert instantiate(compose_cfg().loss).mask_resolution == "full"  # bce_dice_lang


def test_weights_are_keyed_by_term_and_an_unknown_term_is_an_error():
    assert Sa2VALoss(weights={"dice": 2.0}).weights == {
        "bce": 0.0,  # a term left out weighs nothing
        "dice": 2.0,
        "lang": 0.0,
        "focal": 0.0,
        "cldice": 0.0,
    }
    with pytest.raises(ValueError, match=r"loss.weights: unknown term\(s\) \['mask'\]"):
        Sa2VALoss(weights={"mask": 1.0})
    with pytest.raises(ValueError, match="every loss weight is zero"):
        Sa2VALoss(weights={"bce": 0.0})
