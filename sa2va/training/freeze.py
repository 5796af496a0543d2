"""Freezing policies: ordered name-pattern rules and optional last-N LLM layers; a policy only
sets ``requires_grad`` (LoRA adapters are part of the model: ``model.lora``).

Parameter names are matched with `re.search`, the last matching rule wins (as SAM 2's
training code chooses parameter groups by name patterns), so a policy reads top-down:
"freeze the LLM, ... but train its LoRA weights". As there, every rule must match at least
one parameter: a pattern that matches nothing is a typo or a rule for another model (unless
the rule says ``optional``: a part some models leave out, like the temporal module).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from sa2va.utils import last_match

# Module families for the parameter table, first match wins.
MODULE_FAMILIES: list[tuple[str, str]] = [
    ("lora", r"lora_"),
    ("vision", r"vision_tower\."),
    ("mm_connector", r"multi_modal_projector\."),
    ("llm", r"language_model\.|lm_head\."),
    ("projector", r"text_hidden_fcs\."),
    ("temporal", r"^temporal\."),
    ("sam2_encoder", r"sam2\.image_encoder\."),
    ("sam2_decoder", r"sam2\.(sam_mask_decoder|sam_prompt_encoder)\."),
    ("sam2_memory", r"sam2\."),
    ("other", r""),
]


def module_family(name: str) -> str:
    return next(family for family, pattern in MODULE_FAMILIES if re.search(pattern, name))


@dataclass
class FreezeRule:
    pattern: str
    trainable: bool
    # a rule for a part some models leave out (the temporal module): it may match nothing
    optional: bool = False


class FreezePolicy:
    """Sets `requires_grad` on a `Sa2VA` model from a `conf/freeze` preset.

    The arguments are checked here, when the policy is built (a start-up check builds it
    before any model); the rules are checked against the model's names in :meth:`apply`.
    """

    def __init__(
        self,
        name: str,
        default_trainable: bool = True,
        rules: Sequence[Mapping[str, Any]] = (),
        llm_last_n: int | None = None,
    ) -> None:
        self.config = {
            "name": name,
            "default_trainable": default_trainable,
            "rules": [dict(r) for r in rules],
            "llm_last_n": llm_last_n,
        }
        self.name = name
        self.default_trainable = default_trainable
        self.rules = [FreezeRule(**r) for r in rules]
        self.llm_last_n = llm_last_n
        for rule in self.rules:
            try:
                re.compile(rule.pattern)
            except re.error as e:
                raise ValueError(f"rule {rule.pattern!r}: not a regular expression ({e})") from e
        if not default_trainable and not llm_last_n and not any(r.trainable for r in self.rules):
            raise ValueError("default_trainable=false and no rule trains anything")

    def trainable(self, name: str) -> bool:
        """Whether the rules train parameter ``name``: the last rule whose pattern matches."""
        rules = ((rule.pattern, rule.trainable) for rule in self.rules)
        return bool(last_match(name, rules, self.default_trainable))

    def apply(self, model: nn.Module) -> None:
        names = [name for name, _ in model.named_parameters()]
        unmatched = [
            r
            for r in self.rules
            if not r.optional and not any(re.search(r.pattern, n) for n in names)
        ]
        if unmatched:
            raise ValueError(
                f"freeze={self.name}: rule {{pattern: {unmatched[0].pattern!r}, trainable: "
                f"{str(unmatched[0].trainable).lower()}}} matches no parameter of "
                f"{type(model).__name__} ({len(unmatched)} such rule(s))"
            )
        last_n_pattern = self._last_n_pattern(model)
        for name, param in model.named_parameters():
            trainable = self.trainable(name)
            if last_n_pattern and re.search(last_n_pattern, name):
                trainable = True
            param.requires_grad_(trainable)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"freeze policy {self.name!r} leaves no trainable parameter")

    def _last_n_pattern(self, model: nn.Module) -> str | None:
        if not self.llm_last_n:
            return None
        num_layers = model.mllm.config.text_config.num_hidden_layers
        if not 0 < self.llm_last_n <= num_layers:
            raise ValueError(
                f"freeze.llm_last_n={self.llm_last_n} but the LLM has {num_layers} layers"
            )
        first = num_layers - self.llm_last_n
        layers = "|".join(str(i) for i in range(first, num_layers))
        return rf"language_model\..*layers\.({layers})\."


def parameter_table(model: nn.Module) -> list[dict[str, Any]]:
    """Total and trainable parameter counts per module family (rows in MODULE_FAMILIES order)."""
    rows = {family: {"module": family, "total": 0, "trainable": 0} for family, _ in MODULE_FAMILIES}
    for name, param in model.named_parameters():
        row = rows[module_family(name)]
        row["total"] += param.numel()
        row["trainable"] += param.numel() if param.requires_grad else 0
    table = [r for r in rows.values() if r["total"]]
    table.append(
        {
            "module": "all",
            "total": sum(r["total"] for r in table),
            "trainable": sum(r["trainable"] for r in table),
        }
    )
    return table


def format_parameter_table(table: list[dict[str, Any]]) -> str:
    lines = [f"{'module':<14}{'total':>16}{'trainable':>16}{'%':>8}"]
    for row in table:
        share = 100.0 * row["trainable"] / max(row["total"], 1)
        lines.append(f"{row['module']:<14}{row['total']:>16,}{row['trainable']:>16,}{share:>7.1f}%")
    return "\n".join(lines)
