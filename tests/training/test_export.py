"""Export: the failure of the user's earlier converter (different checkpoints exporting the
same model) is impossible — nothing pretrained is read and every weight loads strictly."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import lora_checkpoint
from helpers.configs import FAST_DATA, FAST_TRAIN
from helpers.official_fixtures import RELEASE as CHAT
from helpers.official_fixtures import assert_bit_equal, official_release_state, tiny_sam2_config
from helpers.trained_fixture import trained  # noqa: F401  (fixture)
from huggingface_hub import ModelCard, metadata_load
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import sa2va.model.checkpoints as checkpoints
from sa2va.evaluation.evaluate import evaluate
from sa2va.evaluation.report import format_stat
from sa2va.inference.predict import load_model
from sa2va.model.checkpoints import load_official_sa2va, read_state_dict
from sa2va.model.releases import release_from_config, release_shapes
from sa2va.model.sa2va import Sa2VA
from sa2va.model.trained import load_exported, load_trained
from sa2va.training.export import export, write_official_release
from sa2va.training.model_card import release_like
from sa2va.training.run import train
from sa2va.utils import CONF_DIR, REPO_ROOT


@pytest.fixture(scope="module")
def checkpoints_at(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[int, Path]:
    """A tiny run (train(cfg), FAST_TRAIN) keeping its checkpoints after 2 and after 4 steps."""
    out = tmp_path_factory.mktemp("run")
    GlobalHydra.instance().clear()
    overrides = [*FAST_TRAIN, "callbacks.model_checkpoint.save_top_k=-1", "logger=none",
                 f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}"]  # fmt: skip
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        train(cfg)
    finally:
        GlobalHydra.instance().clear()
    kept = [p for p in (out / "checkpoints").glob("*.ckpt") if not p.name.startswith("last")]
    return {torch.load(p, weights_only=True)["global_step"]: p for p in kept}


def masks(model: torch.nn.Module) -> torch.Tensor:
    frame = Image.new("RGB", (64, 64), (120, 60, 60))
    return model.predict_forward([frame], ["Please segment the blood vessel."])["masks"]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_two_checkpoints_export_two_models_that_predict_as_their_checkpoints(
    checkpoints_at, tmp_path
):
    exported = {}
    for name, ckpt in (("two", checkpoints_at[2]), ("four", checkpoints_at[4])):
        manifest = export(ckpt, tmp_path / name)
        assert manifest["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
        assert manifest["lora"] == "none" and manifest["source_kind"] == "lightning"
        assert json.loads((tmp_path / name / "manifest.json").read_text()) == manifest
        original, _ = load_trained(ckpt)
        copy = load_exported(tmp_path / name)
        assert torch.equal(masks(copy), masks(original))
        assert same_weights(copy, original)
        exported[name] = (load_file(tmp_path / name / "model.safetensors"), masks(copy))

    (two, two_masks), (four, four_masks) = exported["two"], exported["four"]
    assert two.keys() == four.keys()
    assert sum(not torch.equal(two[k], four[k]) for k in two) > len(two) // 2
    assert not torch.equal(two_masks, four_masks)

    model, meta = load_model(tmp_path / "four", torch.device("cpu"))  # eval/predict's loader
    assert torch.equal(masks(model), four_masks) and meta["global_step"] == 4

    with pytest.raises(FileExistsError, match="already exists"):
        export(checkpoints_at[2], tmp_path / "two")


def test_export_reads_no_pretrained_file(checkpoints_at, tmp_path, monkeypatch):
    checkpoint = torch.load(checkpoints_at[2], weights_only=True)
    checkpoint["sa2va"]["model"]["sam2_ckpt"] = str(tmp_path / "no_such_sam2.pt")
    moved = tmp_path / "points_at_missing_pretrained.ckpt"
    torch.save(checkpoint, moved)

    def refuse(*args, **kwargs):
        raise AssertionError("a pretrained file was read")

    monkeypatch.setattr(checkpoints, "load_sam2_checkpoint", refuse)
    monkeypatch.setattr(checkpoints, "load_official_sa2va", refuse)
    monkeypatch.setattr("transformers.InternVLForConditionalGeneration.from_pretrained", refuse)
    export(moved, tmp_path / "export")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    assert all(torch.equal(v, state[k]) for k, v in exported.items())


def test_lora_merged_or_kept_as_adapter(compose_cfg, tmp_path):
    model, ckpt = lora_checkpoint(compose_cfg, tmp_path)
    reference = masks(model.eval())

    assert export(ckpt, tmp_path / "adapter", merge_lora=False)["lora"] == "adapter"
    adapter = load_file(tmp_path / "adapter" / "model.safetensors")
    assert any("lora_A" in k for k in adapter)
    assert torch.equal(masks(load_exported(tmp_path / "adapter")), reference)

    assert export(ckpt, tmp_path / "merged", merge_lora=True)["lora"] == "merged"
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("lora_" in k or "base_model" in k for k in merged)
    assert torch.allclose(masks(load_exported(tmp_path / "merged")), reference, atol=1e-4)


DEEPSPEED_SAVE = textwrap.dedent(
    """
    import os, sys, torch
    import deepspeed, deepspeed.comm.torch
    from sa2va.model.trained import load_trained
    # the shared-memory all-reduce is an optional speed-up, compiled on first use: skip it
    deepspeed.comm.torch.build_shm_op = lambda: None
    model, meta = load_trained(sys.argv[1])
    holder = torch.nn.Module()
    holder.model = model  # Lightning's names: model.<...>
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=holder, model_parameters=holder.parameters(),
                                      config=config)
    info = {k: meta[k] for k in ("model", "model_class", "freeze", "threshold")}
    # as Lightning's DeepSpeedStrategy.save_checkpoint: tag "checkpoint", client state
    engine.save_checkpoint(sys.argv[2], tag="checkpoint",
                           client_state={"sa2va": info, "global_step": meta["global_step"]})
    """
)


@pytest.mark.slow  # a DeepSpeed engine in a subprocess: ~10 s of imports and set-up
def test_deepspeed_zero3_folder_is_consolidated_and_exported(checkpoints_at, tmp_path):
    two_step_ckpt = checkpoints_at[2]
    folder = tmp_path / "last.ckpt"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_SAVE, str(two_step_ckpt), str(folder)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (folder / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()

    manifest = export(folder, tmp_path / "export")
    assert manifest["source_kind"] == "deepspeed" and manifest["global_step"] == 2
    original, _ = load_trained(two_step_ckpt)
    copy = load_exported(tmp_path / "export")
    assert same_weights(copy, original)
    assert torch.equal(masks(copy), masks(original))


# ------------------------------------------------------- the official HF release layout


def fixture_model() -> Sa2VA:
    """A project model with the architecture of the official tiny chat model (fixture 3:
    its config.json numbers) and the fixture's tiny SAM 2.0; its vocabulary resized to the
    fixture's 371 rows."""
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, "attention_bias": True, "use_qk_norm": False,
              "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu",
              "image_size": [448, 448], "patch_size": [14, 14]}  # fmt: skip
    text = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "tie_word_embeddings": False}  # fmt: skip
    config = {"downsample_ratio": 0.5, "vision_feature_layer": -1, "tie_word_embeddings": False,
              "vision_config": vision, "text_config": text}  # fmt: skip
    model = Sa2VA(
        mllm={"path": None, "config": config}, sam2=tiny_sam2_config(), load_pretrained=False
    )
    model.mllm.resize_token_embeddings(371)
    return model


def test_official_release_in_project_model_out_is_bit_exact(tmp_path):
    """Official layout in, through the project's loader and model, official layout out."""
    official = official_release_state()
    source = tmp_path / "Sa2VA-tiny"
    source.mkdir()
    save_file(official, source / "model.safetensors")
    model = fixture_model()
    assert load_official_sa2va(model, source).ok
    files = write_official_release(model, tmp_path / "out")
    assert files == ["model.safetensors"]
    assert_bit_equal(load_file(tmp_path / "out" / "model.safetensors"), official)

    written = json.loads((tmp_path / "out" / "config.json").read_text())
    reference = json.loads((CHAT / "config.json").read_text())
    assert reference["auto_map"].items() <= written["auto_map"].items()
    for key in ("architectures", "model_type", "template", "select_layer", "downsample_ratio",
                "force_image_size", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch",
                "max_dynamic_patch", "ps_version", "pad2square", "hidden_size",
                "tie_word_embeddings", "use_backbone_lora", "use_llm_lora"):  # fmt: skip
        assert written[key] == reference[key], key
    for key, value in written["vision_config"].items():
        assert value == reference["vision_config"][key], key
    llm, reference_llm = written["llm_config"], reference["llm_config"]
    for key in ("architectures", "model_type", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "max_position_embeddings", "hidden_act",
                "tie_word_embeddings"):  # fmt: skip
        assert llm[key] == reference_llm[key], key
    assert llm["rope_theta"] == reference_llm["rope_parameters"]["rope_theta"]


def test_export_format_official_merges_lora_and_loads_back(compose_cfg, tmp_path):
    model, ckpt = lora_checkpoint(compose_cfg, tmp_path)
    with pytest.raises(ValueError, match="format=official needs merge_lora=true"):
        export(ckpt, tmp_path / "adapter", merge_lora=False, format="official")

    out = tmp_path / "release"
    manifest = export(ckpt, out, format="official")
    assert manifest["format"] == "sa2va-official-release/1" and manifest["lora"] == "merged"
    weights = read_state_dict(out)
    assert not any("lora_" in k or "base_model" in k for k in weights)
    assert any(k.endswith(".g_weight") for k in weights)  # SAM 2's layer scale, release name
    # config.json describes exactly the file: the shapes it implies are the file's shapes
    sam2 = {k: tuple(v.shape) for k, v in model.sam2.state_dict().items()}
    release = release_from_config("export", json.loads((out / "config.json").read_text()), None)
    assert release_shapes(release, sam2) == {k: tuple(v.shape) for k, v in weights.items()}
    assert "[SEG]" in AutoTokenizer.from_pretrained(out).get_vocab()

    model.merge_lora()  # its config then describes the release: no adapters
    fresh = Sa2VA(**model.config, load_pretrained=False)
    assert load_official_sa2va(fresh, out).ok
    assert same_weights(fresh, model)


def test_official_release_names_the_template_the_model_prompts_with(compose_cfg, tmp_path):
    """Sa2VA-4B prompts with phi3_chat although its LLM is Qwen2: the release must say so."""
    cfg = compose_cfg("model.mllm.template=phi3_chat")
    model = Sa2VA(**{k: v for k, v in cfg.model.items() if not k.startswith("_")})
    write_official_release(model, tmp_path / "phi3")
    assert json.loads((tmp_path / "phi3" / "config.json").read_text())["template"] == "phi3_chat"
    write_official_release(model, tmp_path / "override", template="qwen_chat")
    assert (
        json.loads((tmp_path / "override" / "config.json").read_text())["template"] == "qwen_chat"
    )


def test_export_carries_a_model_card_with_the_runs_numbers(trained, compose_cfg, tmp_path):  # noqa: F811
    """README.md: the run's loss and validation numbers, the last eval's CIs, the tuned
    threshold, the split counts and hash, and metadata the hub library reads back (offline)."""
    run = Path(shutil.copytree(trained.run_dir, tmp_path / "train_run"))  # eval writes beside it
    ckpt = run / "checkpoints" / trained.ckpt.name
    overrides = [*FAST_DATA, "eval.n_boot=50", "eval.num_figures=0", "eval.tune_threshold=true"]
    evaluation = evaluate(compose_cfg(f"ckpt_path={ckpt}", *overrides, config_name="eval"))
    export(ckpt, tmp_path / "export")
    readme = tmp_path / "export" / "README.md"
    text = readme.read_text()

    card = ModelCard.load(readme)
    metadata = metadata_load(readme)
    assert metadata["pipeline_tag"] == "image-segmentation" and "research-only" in metadata["tags"]
    per_image = evaluation["results"]["default"]["per_image"]
    assert {(r.metric_type, r.metric_value, r.dataset_split) for r in card.data.eval_results} == {
        (key, round(per_image[key]["mean"], 4), "test") for key in ("dice", "iou")
    }
    for result in evaluation["results"].values():
        dice = result["per_image"]["dice"]
        assert format_stat(dice, evaluation["n_videos"]) in text  # the eval report's own cell
    assert f"**{evaluation['threshold_tuning']['threshold']:g}**, tuned on the val split" in text
    recorded = json.loads((run / "metrics.json").read_text())
    assert f"val/dice {recorded['metrics']['val/dice']:.4f}" in text
    assert '"name": "bce_dice_lang"' in text and '"weights.lang": 0.5' in text
    dm = instantiate(compose_cfg(*FAST_DATA).data)
    ids = {s: dm.video_ids(s) for s in ("train", "val", "test")}
    for split, videos in ids.items():
        assert f"| {split} | {len(videos)} | {len(dm.records(split))} |" in text
    assert hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest() in text
    assert "not a medical device" in text and "no official release's shape" in text
    assert release_like({"name": "sa2va_8b"}) == "ByteDance/Sa2VA-InternVL3-8B"  # shapes
    assert f"hf upload <user>/export {tmp_path / 'export'} . --repo-type model" in text

    export(run / "checkpoints" / "last.ckpt", tmp_path / "plain")  # never evaluated
    plain = ModelCard.load(tmp_path / "plain" / "README.md")
    assert "No `sa2va.eval` of this checkpoint" in plain.text and not plain.data.eval_results
