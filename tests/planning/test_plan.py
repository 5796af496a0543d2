"""The memory planner against measurements: model-state bytes after a real AdamW step,
activation bytes against the tensors autograd really saves (CPU traces)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch import nn
from transformers import InternVLVisionConfig, InternVLVisionModel, Qwen2Config, Qwen2Model

from sa2va.model.sam2 import build_sam2
from sa2va.planning.activations import hiera_bytes, llm_layer_bytes, lora_targets, vit_layer_bytes
from sa2va.planning.report import format_plan, plan
from sa2va.planning.states import (
    ROWS,
    ParamStats,
    Setup,
    build_meta_model,
    model_state_bytes,
    selected_setup,
)
from sa2va.utils import to_plain


def saved_bytes(module: nn.Module, run) -> int:
    """Bytes of the distinct tensors autograd saves for backward (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def test_model_state_bytes_equal_a_real_adamw_step(compose_cfg):
    cfg = compose_cfg("freeze=official")  # frozen, trainable and LoRA parameters
    planned = ParamStats.of(build_meta_model(cfg.model, cfg.freeze))

    torch.manual_seed(0)
    model = instantiate(cfg.model)
    instantiate(cfg.freeze).apply(model)
    assert ParamStats.of(model) == planned  # the meta build is the real architecture
    optimizer, _ = instantiate(cfg.optim).build(model.named_parameters(), total_steps=10)
    frame = Image.new("RGB", (64, 64), (90, 40, 40))
    batch = model.processor.collate(
        [model.processor([frame], ["Segment the vessel."], ["Sure, [SEG]."])]
    )
    out = model(batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # heads the loss does not reach (SAM2's IoU/object-score heads) would keep no gradient;
    # DeepSpeed allocates gradients for every trainable tensor, and so does the planner
    touch = torch.stack([p.sum() for p in trainable]).sum() * 0
    (out.lm_loss + out.pred_masks[0].float().mean() + touch).backward()
    optimizer.step()

    measured_params = sum(p.numel() * p.element_size() for p in model.parameters())
    measured_grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    measured_optim = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
    states = model_state_bytes(planned, Setup("single", "torch"), "32-true", world=1, per_node=1)
    assert (states.params, states.grads, states.optimizer) == (
        measured_params,
        measured_grads,
        measured_optim,
    )
    assert states.working == 0 and states.cpu == 0


def test_sharding_and_offload_divide_the_right_states():
    stats = ParamStats(1000, 100, 10, 2000, 400, 50, ["llm"])
    kw = {"precision": "bf16-mixed", "world": 4, "per_node": 4, "buckets": 0}
    zero0, zero2, zero3, offload = (
        model_state_bytes(stats, Setup(n, "deepspeed", stage, o, o), **kw)
        for n, stage, o in (("0", 0, False), ("2", 2, False), ("3", 3, False), ("3o", 3, True))
    )
    # 2 bytes per weight (frozen ones too), 2 per trainable gradient, 12 of fp32 states
    assert (zero0.params, zero0.grads, zero0.optimizer) == (2000, 200, 1200)
    assert (zero2.params, zero2.grads, zero2.optimizer) == (2000, 50, 300)
    assert (zero3.params, zero3.grads, zero3.optimizer, zero3.working) == (500, 50, 300, 200)
    assert (offload.params, offload.grads, offload.optimizer) == (0, 0, 0)
    assert offload.cpu == (1200 + 400) // 4 * 4 + 500 * 4  # states + fp32 grads, weights


def qwen2(layers: int = 1) -> Qwen2Config:
    return Qwen2Config(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        attn_implementation="sdpa",
    )


def intern_vit(layers: int = 1, qk_norm: bool = False) -> InternVLVisionConfig:
    return InternVLVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=[112, 112],
        patch_size=[14, 14],
        attention_bias=True,
        use_qk_norm=qk_norm,
        norm_type="rms_norm" if qk_norm else "layer_norm",
        attn_implementation="sdpa",
    )


def one_layer_bytes(build, run) -> int:
    """What one layer saves: a 2-layer model minus a 1-layer one (the rest cancels)."""
    one, two = (saved_bytes(model, lambda m=model: run(m)) for model in (build(1), build(2)))
    return two - one


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(("dtype", "act"), [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("case", ["trainable", "frozen", "lora", "lora_dropout"])
def test_llm_layer_formula_equals_a_cpu_trace(dtype, act, case):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    x = torch.randn(2, 96, 128, dtype=dtype, requires_grad=True)  # input needs a gradient
    dropout = 0.1 if case == "lora_dropout" else 0.0
    holders = {}

    def build(layers: int) -> nn.Module:
        model = Qwen2Model(qwen2(layers)).to(dtype)
        if case == "frozen":
            model.requires_grad_(False)
        elif case.startswith("lora"):  # peft freezes the base weights; keeps adapters
            lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=LORA_TARGETS)
            model = get_peft_model(model, lora).train().to(dtype)  # in fp32: cast as DeepSpeed
        holders[layers] = nn.Module()
        holders[layers].language_model = model
        return model

    measured = one_layer_bytes(build, lambda m: m(inputs_embeds=x))
    targets = lora_targets(holders[1]) if case.startswith("lora") else []
    assert len(targets) == (7 if case.startswith("lora") else 0)
    # CPU dropout keeps its mask in the activation dtype, a GPU's fused dropout in 1 byte
    formula = llm_layer_bytes(qwen2(), act, case == "trainable", targets, mask_bytes=act)
    assert measured == 2 * 96 * formula


@pytest.mark.parametrize(("dtype", "act"), [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_vit_layer_formula_equals_a_cpu_trace(dtype, act, qk_norm):
    pixels = torch.randn(2, 3, 112, 112, dtype=dtype)  # 8 x 8 patches + CLS = 65 tokens
    measured = one_layer_bytes(
        lambda n: InternVLVisionModel(intern_vit(n, qk_norm)).to(dtype),
        lambda m: m(pixel_values=pixels),
    )
    formula = 2 * 65 * vit_layer_bytes(intern_vit(1, qk_norm), act)
    assert measured == pytest.approx(formula, rel=0.002)  # bf16 LayerNorm: 8 bytes apart


@pytest.mark.parametrize("sam2_cfg", ["tiny", "hiera_t"])
def test_hiera_bytes_equal_a_cpu_trace(compose_cfg, sam2_cfg):
    sam2 = build_sam2(
        to_plain(compose_cfg(f"model/sam2={sam2_cfg}", "model.sam2.image_size=128").model.sam2)
    )
    images = torch.randn(2, 3, 128, 128)
    measured = saved_bytes(sam2, lambda: sam2.image_encoder.trunk(images))
    assert measured == 2 * hiera_bytes(sam2.image_encoder.trunk, 128, 4)


@pytest.mark.parametrize(
    ("model", "published_billions"),
    [("sa2va_1b", 0.938), ("sa2va_4b", 3.71), ("sa2va_8b", 7.94), ("sa2va_26b", 25.5)],
)
def test_real_configs_have_the_published_size(compose_cfg, model, published_billions):
    """The MLLM part (without LoRA) matches InternVL3-1B/8B and InternVL2.5-4B/26B."""
    cfg = compose_cfg(f"model={model}", "freeze=full")
    meta = build_meta_model(cfg.model, cfg.freeze)
    mllm = sum(p.numel() for n, p in meta.named_parameters() if n.startswith("mllm."))
    assert mllm / 1e9 == pytest.approx(published_billions, rel=0.01)


def test_selected_setup_follows_the_trainer_config(compose_cfg):
    deepspeed = compose_cfg("trainer=deepspeed_stage_3").trainer
    assert selected_setup(deepspeed).name == "ZeRO-3"
    assert selected_setup(compose_cfg("trainer=ddp").trainer) == ROWS[0]
    fsdp = selected_setup(compose_cfg("trainer=fsdp").trainer)
    assert (fsdp.engine, fsdp.stage) == ("torch", 3)
    assert selected_setup({"strategy": "deepspeed_stage_2_offload"}).name == "ZeRO-2 + offload opt"


def test_plan_for_the_8b_model_on_four_24gb_gpus(compose_cfg):
    cfg = compose_cfg(
        "model=sa2va_8b", "trainer=deepspeed_stage_3", "trainer.devices=4", "plan.gpu_memory_gb=24",
        config_name="plan",
    )  # fmt: skip
    result = plan(cfg)
    rows = {row["setup"]: row for row in result["rows"]}
    ours = rows["ZeRO-3"]
    theirs = result["deepspeed"]["rows"]["ZeRO-3"]["gpu"]
    # DeepSpeed counts 18 bytes for all 8.5 B parameters; only 17% train here
    assert ours["params"] + ours["grads"] + ours["optimizer"] + ours["working"] < 0.5 * theirs
    assert ours["selected"] and result["stats"]["total"] > 8e9
    assert result["activations"]["True"]["llm"] < result["activations"]["False"]["llm"] / 5
    assert result["activations"]["False"]["vision"] == 0  # frozen and first: nothing saved
    suggestion = result["suggestion"]
    assert suggestion["gpu_total"] <= 24 * 2**30
    assert suggestion["micro_batch"] * 4 * suggestion["accumulate_grad_batches"] == 32
    text = format_plan(result)
    assert "*ZeRO-3" in text and "DeepSpeed's estimate" in text and "suggestion:" in text
