"""The GPU check on a machine without a GPU: it plans every case, then refuses with a clear
message. (The tiny model stands in for sa2va_8b: the planner is the same code.)"""

from __future__ import annotations

import json

import pytest
import torch

from sa2va.benchmarks.run import run_bench

TINY = ["bench.gpu.model=sa2va_tiny", "bench.gpu.freeze=full"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_the_gpu_check_plans_every_case_then_refuses_without_cuda(compose_cfg, tmp_path):
    cfg = compose_cfg("bench=gpu", *TINY, config_name="bench")
    with pytest.raises(RuntimeError, match=r"bench=gpu needs a CUDA GPU.*8 training cases"):
        run_bench(cfg)
    cases = json.loads((tmp_path / "run" / "gpu_plan.json").read_text())["cases"]
    predicted = {(c["strategy"], c["micro_batch"], c["checkpointing"]): c for c in cases}
    assert set(predicted) == {
        (s, m, c) for s in ("bf16", "zero3") for m in (1, 4) for c in (False, True)
    }
    for strategy in ("bf16", "zero3"):
        gib = {key[1:]: c["predicted_gib"] for key, c in predicted.items() if key[0] == strategy}
        assert 0 < gib[1, True] < gib[1, False] < gib[4, False]  # checkpointing saves memory
        assert gib[1, True] < gib[4, True]
    zero3 = predicted["zero3", 1, False]["overrides"]
    assert "trainer=deepspeed_stage_3" in zero3 and "trainer.devices=1" in zero3
    assert "model.gradient_checkpointing=false" in zero3 and "data.batch_size=1" in zero3
