"""The benchmark in a smoke configuration: output structure and the "identical" checks.

No timing is asserted anywhere: timings belong in docs/benchmarks.md, not in tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers.configs import FAST_DATA

from sa2va.benchmarks.harness import Bench, Row, interleave
from sa2va.benchmarks.report import DOC_BEGIN, DOC_END, update_doc
from sa2va.benchmarks.run import run_bench

SMOKE = [
    *FAST_DATA,
    "bench.repeats=1",
    "bench.warmup=0",
    "bench.progress_bar=false",
    "bench.threads=1",
    "bench.clock=cpu",
    "bench.train_loop.steps=2",
    "bench.train_loop.warmup_steps=1",
    "bench.data.samples=2",
    "bench.data.steps=1",
    "bench.data.workers=[0]",
    "bench.inference.frames=2",
    "bench.inference.batch_size=2",
    "bench.memory.steps=1",
    "bench.memory.variants=[bare]",
    "bench.throughput.steps=1",
    # the LLM-dominated shape and the SAM2 sizes, cut to the tiny model's
    "bench.generation.shape=sa2va_tiny",
    "bench.generation.layers=[1]",
    "bench.generation.goal_layers=1",
    "bench.generation.vision_config={image_size:[64,64],patch_size:[8,8]}",
    "bench.generation.frames=1",
    "bench.propagation.sizes=[{sam2:tiny}]",
    "bench.propagation.frames=3",
    "bench.propagation.batch_sizes=[1,2]",
]


def smoke_run(root: Path, sections: list[str], *overrides: str) -> dict:
    """One smoke run of ``sections``, composed like the Hydra app, outputs under ``root``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from sa2va.utils import CONF_DIR

    overrides = (*SMOKE, f"bench.sections=[{','.join(sections)}]", *overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("bench", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
        cfg.paths.cache_dir = str(root / "cache")
    try:
        return run_bench(cfg)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def report(root: Path) -> dict:
    """The sections whose variants must agree exactly (fast enough for every test run)."""
    doc = root / "doc.md"
    doc.write_text(f"# Benchmarks\n\nhand-written intro\n\n{DOC_BEGIN}\nold\n{DOC_END}\nafter\n")
    return smoke_run(
        root, ["train_loop", "inference", "generation", "propagation"], f"bench.doc={doc}"
    )


def rows_of(report: dict, section: str) -> dict[str, dict]:
    return {r["name"]: r for r in report["rows"] if r["section"] == section}


def check_rows(report: dict) -> None:
    for row in report["rows"]:
        assert row["a"] > 0 and row["b"] > 0 and math.isfinite(row["ratio"]), row
        assert row["met"] is None if row["goal"] is None else isinstance(row["met"], bool)


def test_lightning_matches_the_bare_loop_and_both_predict_modes_agree(report):
    check_rows(report)
    (train,) = rows_of(report, "train_loop").values()
    assert train["identical"] is True and train["goal"] == "<= 1.05"
    inference = rows_of(report, "inference")
    assert inference["generate / fast, s per frame"]["identical"] is True
    assert inference["per_frame batch 1 / batch 2, s per frame"]["identical"] is True
    assert {r["goal"] for r in inference.values()} == {None}  # goals: generation, propagation
    assert report["machine"]["cores_usable"] >= 1 and report["machine"]["device"] == "cpu"


def test_generation_rows_compare_generate_and_both_fast_passes(report):
    rows = rows_of(report, "generation")
    generate = rows["generate / fast at 1 LLM layers, s per frame"]
    assert generate["identical"] is True and generate["goal"] == "<= 1.3"
    assert "['Sure, [SEG].']" in generate["note"]
    before = rows["fast / fast with vocabulary logits (before) at 1 LLM layers, s per frame"]
    assert before["identical"] is True and before["goal"] is None


def test_propagation_is_compared_with_sam2_video_predictor(report):
    (row,) = rows_of(report, "propagation").values()
    assert row["name"] == "propagate / SAM2VideoPredictor, tiny at 256 px, s per frame"
    assert row["goal"] == "<= 1.0" and "image-encoder batch chosen by measurement" in row["note"]
    (overlap,) = [m for m in report["measures"] if m["section"] == "propagation"]
    assert overlap["name"] == "tiny at 256 px: memory-tracked frames' mean IoU vs the predictor"
    assert 0.0 <= overlap["value"] <= 1.0


def test_outputs_are_written_and_the_doc_fragment_replaced(report, root):
    written = json.loads((root / "run" / "bench.json").read_text())
    assert written["rows"] == report["rows"]
    sections = {"train_loop", "inference", "generation", "propagation"}
    assert set(written["section_seconds"]) == sections
    table = (root / "run" / "bench.md").read_text()
    assert "| train_loop | Lightning fit / bare PyTorch loop" in table
    doc = (root / "doc.md").read_text()
    assert doc.startswith("# Benchmarks\n\nhand-written intro\n\n" + DOC_BEGIN)
    assert "\nold\n" not in doc and table in doc and doc.endswith(f"{DOC_END}\nafter\n")


@pytest.mark.slow
def test_data_cache_memory_and_throughput_sections(tmp_path):
    report = smoke_run(tmp_path, ["data", "feature_cache", "memory", "throughput"])
    check_rows(report)
    assert len(rows_of(report, "data")) == 2
    cache = rows_of(report, "feature_cache")
    assert len(cache) == 4 and all(row["identical"] is True for row in cache.values())
    assert " 0 hits" not in cache["cache on: epochs 2+ / epoch 1, s per epoch"]["note"]
    measures = {m["name"]: m for m in report["measures"]}
    before = measures["bare: RSS before the steps (model, data, one batch)"]["value"]
    assert measures["bare: peak RSS during 1 steps"]["value"] >= before > 0
    assert measures["sa2va_tiny: FLOPs per step"]["value"] > 0
    assert measures["sa2va_tiny: tokens/s"]["value"] > 0
    assert "sa2va_tiny: MFU" not in measures  # no peak given


def test_update_doc_creates_a_missing_file(tmp_path: Path):
    update_doc(tmp_path / "new.md", "table\n")
    assert (tmp_path / "new.md").read_text() == f"{DOC_BEGIN}\ntable\n{DOC_END}\n"


def test_interleave_alternates_the_order_and_takes_medians():
    calls: list[str] = []
    values = {"a": iter([9.0, 1.0, 2.0, 3.0]), "b": iter([9.0, 5.0, 7.0, 6.0])}

    def variant(name: str):
        return lambda: (calls.append(name), (next(values[name]), name))[1]

    medians, outputs = interleave({"a": variant("a"), "b": variant("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert medians == {"a": 2.0, "b": 6.0} and outputs == {"a": "a", "b": "b"}


def test_goals_read_as_ratio_bounds():
    assert Row("s", "x", 1.04, 1.0, "s", goal="<= 1.05").met is True
    assert Row("s", "x", 2.0, 1.0, "s", goal=">= 3").met is False
    assert Row("s", "x", 1.0, 1.0, "s").met is None
    assert Row("s", "x", 0.92, 1.0, "s", goal="within 0.1").met is True
    assert Row("s", "x", 1.12, 1.0, "s", goal="within 0.1").met is False
    with pytest.raises(ValueError, match="write '<= x', '>= x' or 'within x'"):
        Row("s", "x", 1.0, 1.0, "s", goal="< 2")


def test_a_real_shape_without_files_gets_its_vocabulary_and_keeps_what_trains(compose_cfg):
    """Random-weight shapes get the real embedding and LM-head sizes, frozen as configured."""
    cfg = compose_cfg(
        *FAST_DATA,
        "freeze=sam2_frozen",  # the LLM's own weights are frozen
        "+model.mllm.config.text_config.vocab_size=1500",
        "model.mllm.path=null",
        config_name="bench",
    )
    module, _ = Bench(cfg).build()
    mllm = module.model.mllm
    assert mllm.get_input_embeddings().weight.shape[0] == mllm.lm_head.weight.shape[0] == 1500
    assert not mllm.get_input_embeddings().weight.requires_grad
    assert not mllm.lm_head.weight.requires_grad


def test_the_llm_shape_is_the_composed_preset_with_its_real_vocabulary():
    """The bench's LLM-dominated model has the preset's full text config, base file included
    (a raw read of conf/model/sa2va_1b.yaml would miss the 151,679-token vocabulary)."""
    import types

    from sa2va.benchmarks.generation import llm_shape_model
    from sa2va.benchmarks.harness import compose_config
    from sa2va.training.config import register_schemas

    register_schemas()
    cfg = compose_config("bench", ["bench=quick"])
    model = llm_shape_model(types.SimpleNamespace(opts=cfg.bench, cfg=cfg), 24)
    text = model.mllm.config.text_config
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers) == (151679, 896, 24)
