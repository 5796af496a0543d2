"""The shared helpers of sa2va/utils.py: the run record, atomic folders, last-match rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sa2va.utils import atomic_dir, last_match, run_record


class Stop(SystemExit):
    """Stands for a stop that is no failure (the trainer's preemption)."""


def test_run_record_writes_the_summary_however_the_block_ends(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    with run_record(path, {"status": "running"}) as summary:
        summary["status"] = "completed"
    assert json.loads(path.read_text()) == {"status": "completed"}

    closed = []

    def close(summary: dict) -> None:  # runs after the file is written
        closed.append((summary["status"], json.loads(path.read_text())["status"]))

    with pytest.raises(ValueError), run_record(path, {"status": "running"}, True, close):
        raise ValueError("bad")
    assert json.loads(path.read_text())["error"] == "ValueError: bad"
    assert closed == [("failed", "failed")]

    with pytest.raises(Stop), run_record(path, {"status": "running"}, stops={Stop: "stopped"}):
        raise Stop("signal at step 3")
    assert json.loads(path.read_text()) == {"status": "stopped", "error": "signal at step 3"}

    with pytest.raises(RuntimeError), run_record(tmp_path / "rank1.json", {}, write=False):
        raise RuntimeError("not rank 0")
    assert not (tmp_path / "rank1.json").exists()


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []

    with atomic_dir(final) as tmp:
        (tmp / "whole.txt").write_text("mine")
    assert (final / "whole.txt").read_text() == "mine"

    with atomic_dir(final, taken_ok=True) as tmp:  # another worker finished first
        (tmp / "whole.txt").write_text("theirs")
    assert (final / "whole.txt").read_text() == "mine"
    with pytest.raises(OSError), atomic_dir(final) as tmp:
        (tmp / "whole.txt").write_text("theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_last_match_lets_later_rules_refine_earlier_ones() -> None:
    rules = [(r"^sam2\.", 1.0), (r"mask_decoder", 10.0)]
    assert last_match("sam2.sam_mask_decoder.conv_s0.weight", rules, 0.0) == 10.0
    assert last_match("sam2.image_encoder.trunk.weight", rules, 0.0) == 1.0
    assert last_match("mllm.lm_head.weight", rules, 0.0) == 0.0
