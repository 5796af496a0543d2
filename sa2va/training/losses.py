"""Weighted segmentation + language losses: `L = sum of weights[term] * term` over the terms
`bce`, `dice`, `lang` (LM cross-entropy), `focal` and `cldice`.

The weights are keyed by the name of the term they scale (as SAM 2's training losses): the
same name is the key in `loss.weights`, in the returned dict and in the logged metric
(`train/loss_bce`). A term left out of `weights` has weight 0; an unknown name is an error.
Every term is returned separately for logging; only terms with a non-zero weight enter
the total, so a weight of 0 in an ablation really removes that term's gradient.

Resolution. The official Sa2VA computes its mask losses on SAM2's low-resolution logits
(image_size/4: 256 for a 1024 SAM2) against the ground truth nearest-downsampled to that
size (``mask_resolution="low_res"``, ``loss=official``). The user's losses keep the full
resolution (``"full"``: logits upsampled to the mask size): nearest downsampling by 4
drops most pixels of a 1-2 px wide vessel, so thin vessels would vanish from the target.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Naive Dice per mask, averaged over masks (mmdet `DiceLoss(naive_dice=True)`)."""
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1).to(prob.dtype)
    inter = (prob * target).sum(1)
    dice = (2 * inter + eps) / (prob.sum(1) + target.sum(1) + eps)
    return (1 - dice).mean()


def point_sample(masks: Tensor, coords: Tensor) -> Tensor:
    """Values of (N, H, W) maps at (N, P, 2) normalised [0, 1] xy points -> (N, P)."""
    grid = 2.0 * coords.unsqueeze(2) - 1.0
    return F.grid_sample(masks.unsqueeze(1), grid, align_corners=False)[:, 0, :, 0]


def uncertain_point_coords(
    logits: Tensor, num_points: int, oversample_ratio: float, importance_ratio: float
) -> Tensor:
    """Mask2Former point selection: most uncertain (|logit| small) points plus random ones.

    Written here because the reference versions live in detectron2/mmdet, which would
    pull in heavy dependencies (and torchvision) for twenty lines of code.
    """
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device)
    uncertainty = -point_sample(logits.detach(), coords).abs()
    num_uncertain = int(importance_ratio * num_points)
    top = uncertainty.topk(num_uncertain, dim=1).indices
    picked = torch.gather(coords, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    random = torch.rand(n, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([picked, random], dim=1)


MASK_RESOLUTIONS = ("full", "low_res")
TERMS = ("bce", "dice", "lang", "focal", "cldice")
# the user's weights (loss=bce_dice_lang); an immutable default, copied by each loss
DEFAULT_WEIGHTS: Mapping[str, float] = MappingProxyType({"bce": 1.0, "dice": 1.0, "lang": 0.5})


def nearest_resize(masks: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """(..., H, W) binary masks -> (..., h, w) by nearest neighbour (as the official loss)."""
    if tuple(masks.shape[-2:]) == tuple(size_hw):
        return masks
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    return F.interpolate(flat, size_hw, mode="nearest").reshape(*masks.shape[:-2], *size_hw)


def checked_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """``{term: weight}`` for every term (0 where left out); an unknown term or weights that
    are all zero are errors."""
    unknown = sorted(set(weights) - set(TERMS))
    if unknown:
        raise ValueError(f"loss.weights: unknown term(s) {unknown}; the terms are {list(TERMS)}")
    full = {term: float(weights.get(term, 0.0)) for term in TERMS}
    if not any(full.values()):
        raise ValueError(f"every loss weight is zero ({dict(weights)})")
    return full


class Sa2VALoss(nn.Module):
    """Loss of the joint model; weights come from `conf/loss/*.yaml`."""

    def __init__(
        self,
        weights: Mapping[str, float] = DEFAULT_WEIGHTS,
        dice_eps: float = 1.0,
        focal_gamma: float = 2.0,
        focal_alpha: float | None = 0.25,
        cldice_iters: int = 3,
        num_points: int | None = None,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        mask_resolution: str = "full",
        name: str = "custom",
    ) -> None:
        super().__init__()
        if mask_resolution not in MASK_RESOLUTIONS:
            raise ValueError(
                f"loss mask_resolution must be one of {MASK_RESOLUTIONS}, got {mask_resolution!r}"
            )
        self.mask_resolution = mask_resolution
        self.weights = checked_weights(weights)
        self.dice_eps = dice_eps
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.focal = None
        if self.weights["focal"]:
            from monai.losses import FocalLoss

            self.focal = FocalLoss(use_softmax=False, gamma=focal_gamma, alpha=focal_alpha)
        self.cldice = None
        if self.weights["cldice"]:
            from monai.losses import SoftclDiceLoss

            self.cldice = SoftclDiceLoss(iter_=cldice_iters, sigmoid=True)

    def mask_terms(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Per-term mask losses on (N, H, W) logits and binary targets."""
        target = target.to(logits.dtype)
        terms: dict[str, Tensor] = {}
        if self.cldice is not None:  # needs the full 2D mask, never points
            terms["cldice"] = self.cldice(logits.unsqueeze(1), target.unsqueeze(1))
        if self.num_points:
            coords = uncertain_point_coords(
                logits, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            logits, target = point_sample(logits, coords), point_sample(target, coords)
        terms["bce"] = F.binary_cross_entropy_with_logits(logits, target)
        terms["dice"] = dice_loss(logits, target, self.dice_eps)
        if self.focal is not None:
            terms["focal"] = self.focal(logits.unsqueeze(1), target.unsqueeze(1))
        return terms

    def forward(
        self,
        pred_masks: list[Tensor],
        gt_masks: list[Tensor],
        lm_loss: Tensor | None,
        low_res_masks: list[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """`pred_masks`/`gt_masks`: per sample (T, M, H, W). Returns each term and `loss`.

        With ``mask_resolution="low_res"`` the mask terms use ``low_res_masks`` (per sample
        (T, M, h, w) SAM2 low-resolution logits) and the ground truth nearest-downsampled.
        """
        if self.mask_resolution == "low_res":
            if low_res_masks is None:
                raise ValueError(
                    "loss mask_resolution=low_res (loss=official) needs SAM2's low-resolution "
                    "logits; this model gives none (e.g. the U-Net baseline): use a full-"
                    "resolution loss such as loss=bce_dice_lang"
                )
            gt_masks = [
                nearest_resize(g, tuple(p.shape[-2:]))
                for g, p in zip(gt_masks, low_res_masks, strict=True)
            ]
            pred_masks = low_res_masks
        logits = torch.cat([p.flatten(0, 1) for p in pred_masks])
        target = torch.cat([g.flatten(0, 1) for g in gt_masks]).to(logits.device)
        if logits.shape != target.shape:
            raise ValueError(
                f"predicted masks {tuple(logits.shape)} do not match ground truth "
                f"{tuple(target.shape)}: the answer must hold one [SEG] per object"
            )
        terms = self.mask_terms(logits, target) if logits.numel() else {}
        if lm_loss is not None:
            terms["lang"] = lm_loss
        total = sum(self.weights[k] * v for k, v in terms.items() if self.weights[k])
        terms["loss"] = total if isinstance(total, Tensor) else logits.sum() * 0
        return terms
