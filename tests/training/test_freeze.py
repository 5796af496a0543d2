"""Each freezing preset trains exactly the intended parameters, and frozen ones never move."""

from __future__ import annotations

import re

import pytest
import torch
from helpers.batches import synthetic_batch
from hydra.utils import instantiate

from sa2va.training.freeze import FreezePolicy, module_family, parameter_table
from sa2va.training.module import Sa2VAModule

# family -> trainable? (None: depends on the parameter, checked separately)
EXPECTED = {
    "full": dict.fromkeys(
        [
            "vision",
            "mm_connector",
            "llm",
            "projector",
            "sam2_encoder",
            "sam2_decoder",
            "sam2_memory",
        ],
        True,
    ),
    "official": {
        "vision": False,
        "mm_connector": True,  # official trains mlp1 (vision-to-LLM projector)
        "llm": None,  # embed_tokens and lm_head only
        "lora": True,
        "projector": True,
        "sam2_encoder": False,
        "sam2_decoder": None,  # mask decoder only, prompt encoder frozen
        "sam2_memory": False,
    },
    "sam2_frozen": {
        "vision": False,
        "llm": False,
        "lora": True,
        "projector": True,
        "sam2_encoder": False,
        "sam2_decoder": False,
        "sam2_memory": False,
    },
    "sam2_decoder": {
        "vision": False,
        "llm": False,
        "lora": True,
        "projector": True,
        "sam2_encoder": False,
        "sam2_decoder": None,
    },
    "sam2_full": {
        "vision": False,
        "llm": False,
        "lora": True,
        "projector": True,
        "sam2_encoder": True,
        "sam2_decoder": True,
        "sam2_memory": True,
    },
    "llm_last_n": {
        "vision": False,
        "llm": None,  # last layer only
        "projector": True,
        "sam2_encoder": True,
        "sam2_decoder": True,
        "sam2_memory": True,
    },
}


def build_module(compose_cfg, freeze: str, *overrides: str) -> Sa2VAModule:
    cfg = compose_cfg(f"freeze={freeze}", *overrides)
    return Sa2VAModule(
        model=instantiate(cfg.model),
        loss=instantiate(cfg.loss),
        freeze=instantiate(cfg.freeze),
        optim=instantiate(cfg.optim),
    )


def expected_trainable(preset: str, name: str) -> bool | None:
    family = module_family(name)
    rule = EXPECTED[preset].get(family, False)
    if rule is not None:
        return rule
    if preset == "official" and family == "llm":
        return bool(re.search(r"embed_tokens\.|lm_head\.", name))
    if family == "sam2_decoder":
        return "sam_mask_decoder" in name
    if preset == "llm_last_n":
        return bool(re.search(r"layers\.1\.", name))
    raise AssertionError(name)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_trains_exactly_the_intended_parameters(compose_cfg, preset):
    overrides = ["freeze.llm_last_n=1"] if preset == "llm_last_n" else []
    module = build_module(compose_cfg, preset, *overrides)
    optimizer, _ = module.optim.build(module.model.named_parameters(), total_steps=10)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    names = dict(module.model.named_parameters())
    assert ("lora" in {module_family(n) for n in names}) == ("lora" in EXPECTED[preset])
    for name, param in names.items():
        assert param.requires_grad == expected_trainable(preset, name), name
        assert (id(param) in in_optimizer) == param.requires_grad, name


def test_frozen_weights_are_bit_identical_after_a_training_step(compose_cfg):
    module = build_module(compose_cfg, "official")
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    optimizer, _ = module.optim.build(module.model.named_parameters(), total_steps=10)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2  # make every trainable change visible
    batch = synthetic_batch(module.model)
    module._losses(batch)[0]["loss"].backward()
    optimizer.step()
    changed = {
        n for n, p in module.model.named_parameters() if not torch.equal(p.detach(), before[n])
    }
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert changed <= trainable
    # Every trainable tensor that received a gradient moved (LoRA B starts at zero, so A
    # has no gradient on the first step).
    moved_families = {module_family(n) for n in changed}
    assert {"lora", "projector", "sam2_decoder"} <= moved_families


def test_parameter_table_counts_add_up(compose_cfg):
    module = build_module(compose_cfg, "official")
    table = {row["module"]: row for row in parameter_table(module.model)}
    total = sum(p.numel() for p in module.model.parameters())
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert table["all"]["total"] == total
    assert table["all"]["trainable"] == trainable
    assert table["vision"]["trainable"] == 0
    assert table["lora"]["trainable"] == table["lora"]["total"] > 0


def test_llm_last_n_beyond_the_model_is_a_clear_error(compose_cfg):
    with pytest.raises(ValueError, match="llm_last_n=5 but the LLM has 2 layers"):
        build_module(compose_cfg, "llm_last_n", "freeze.llm_last_n=5")


def test_a_rule_that_matches_no_parameter_is_an_error_naming_it(compose_cfg):
    # freeze=official without the model's LoRA adapters: its 'lora_' rule matches nothing
    with pytest.raises(ValueError, match=re.escape("rule {pattern: 'lora_', trainable: true}")):
        build_module(compose_cfg, "official", "~model/lora")
    typo = "freeze.rules=[{pattern:sam_mask_decodr,trainable:false}]"
    with pytest.raises(ValueError, match="'sam_mask_decodr', trainable: false} matches no param"):
        build_module(compose_cfg, "full", typo)


def test_the_policy_checks_its_own_arguments():
    with pytest.raises(ValueError, match="no rule trains anything"):
        FreezePolicy("none", default_trainable=False, rules=[{"pattern": "x", "trainable": False}])
    with pytest.raises(ValueError, match=r"rule '\(': not a regular expression"):
        FreezePolicy("bad", rules=[{"pattern": "(", "trainable": True}])


def test_the_policy_only_sets_requires_grad(compose_cfg):
    """LoRA adapters come from the model config (model.lora), never from the freeze policy."""
    model = instantiate(compose_cfg("freeze=official").model)
    names = [n for n, _ in model.named_parameters()]
    instantiate(compose_cfg("freeze=official").freeze).apply(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert any(module_family(n) == "lora" for n in names)
