"""AdamW with per-pattern learning-rate multipliers and linear warmup -> cosine decay."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from sa2va.utils import last_match


class AdamWCosine:
    """Builds the optimiser and its per-step schedule from `conf/optim`.

    `lr_mult` maps a parameter-name regex to a learning-rate multiplier (last match
    wins), e.g. a projector trained from scratch next to a LoRA-tuned LLM. Biases and
    norm weights (1-D tensors) get no weight decay.
    """

    def __init__(
        self,
        lr: float = 2e-5,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        lr_mult: Mapping[str, float] | None = None,
        name: str = "adamw",
    ) -> None:
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.eps = eps
        self.warmup_ratio = warmup_ratio
        self.min_lr_ratio = min_lr_ratio
        self.lr_mult = dict(lr_mult or {})
        self.name = name

    def param_groups(self, named_params: Iterable[tuple[str, nn.Parameter]]) -> list[dict]:
        groups: dict[tuple[float, bool], dict[str, Any]] = {}
        for name, param in named_params:
            if not param.requires_grad:
                continue
            mult = last_match(name, self.lr_mult.items(), 1.0)
            decay = param.ndim > 1
            group = groups.setdefault(
                (mult, decay),
                {
                    "params": [],
                    "names": [],
                    "lr": self.lr * mult,
                    "weight_decay": self.weight_decay if decay else 0.0,
                },
            )
            group["params"].append(param)
            group["names"].append(name)
        return list(groups.values())

    def build(
        self, named_params: Iterable[tuple[str, nn.Parameter]], total_steps: int
    ) -> tuple[torch.optim.Optimizer, LambdaLR]:
        optimizer = torch.optim.AdamW(
            self.param_groups(named_params), lr=self.lr, betas=self.betas, eps=self.eps
        )
        warmup = max(1, round(self.warmup_ratio * total_steps)) if self.warmup_ratio else 0
        return optimizer, LambdaLR(optimizer, self.schedule(warmup, total_steps))

    def schedule(self, warmup: int, total_steps: int):
        """Multiplier of the base lr at a step: linear warmup, then cosine to min_lr_ratio."""

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

        return factor
