"""Atomic, verified checkpoint files; resumable data order; RNG state in checkpoints."""

from __future__ import annotations

import errno
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import FAST_TRAIN
from hydra.utils import instantiate
from torch.utils.data import Dataset

from sa2va.data.datamodule import OCTClipDataset
from sa2va.data.sampling import ResumableDataLoader, ResumableSampler
from sa2va.model.trained import CheckpointError, DiskFullError
from sa2va.training.checkpointing import AtomicCheckpointIO, RNGState, rng_states, set_rng_states
from sa2va.training.run import train
from sa2va.utils import REPO_ROOT


def _checkpoint(value: float = 1.0) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "global_step": 3}


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(), path)
    return path


def test_save_then_load_round_trips(saved):
    loaded = AtomicCheckpointIO().load_checkpoint(saved)
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["w"], torch.ones(64, 64))
    assert [p.name for p in saved.parent.iterdir()] == ["last.ckpt"]  # no temp file left


def test_a_failed_write_keeps_the_previous_checkpoint(saved):
    before = saved.read_bytes()
    with pytest.raises(Exception, match="pickle"):
        AtomicCheckpointIO().save_checkpoint({**_checkpoint(2.0), "bad": lambda: None}, saved)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["last.ckpt"]


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint(saved):
    """SIGKILL while torch.save is half way through the file: nothing runs afterwards."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from sa2va.training.checkpointing import AtomicCheckpointIO

        class DieWhilePickled:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)

        big = {{"state_dict": {{"w": torch.full((512, 512), 2.0)}}, "z": DieWhilePickled()}}
        AtomicCheckpointIO().save_checkpoint(big, {str(saved)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True)
    assert proc.returncode < 0, proc.stderr.decode()[-2000:]
    loaded = AtomicCheckpointIO().load_checkpoint(saved)
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(64, 64))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b"", "truncated"),
        (lambda b: b[:4000] + bytes(x ^ 0xFF for x in b[4000:4100]) + b[4100:], "CRC mismatch"),
        (lambda b: b"\x80\x04garbage" * 100, "truncated or not a checkpoint"),
    ],
    ids=["half", "empty", "flipped-bytes", "garbage"],
)
def test_a_damaged_checkpoint_fails_with_its_name(saved, damage, message):
    saved.write_bytes(damage(saved.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as info:
        AtomicCheckpointIO().load_checkpoint(saved)
    assert str(saved) in str(info.value)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "obj": Path("x")}, path)  # any class is code to unpickle
    with pytest.raises(
        CheckpointError, match=rf"{path}: .* pickled pathlib.PosixPath, which could run code"
    ):
        AtomicCheckpointIO().load_checkpoint(path)


def test_resuming_from_a_corrupt_last_ckpt_says_so(compose_cfg, tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"PK\x03\x04 this is not a whole checkpoint")
    cfg = compose_cfg(*FAST_TRAIN, "logger=none", f"ckpt_path={ckpt}")
    with pytest.raises(CheckpointError, match=f"{ckpt}: truncated"):
        train(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert written["status"] == "failed" and str(ckpt) in written["error"]


def test_trainer_configs_wire_the_checkpoint_io(compose_cfg):
    trainer = instantiate(compose_cfg().trainer, logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert compose_cfg("trainer=deepspeed_stage_3").trainer.plugins is None


# ------------------------------------------------------------------ full disk


def _full_disk(monkeypatch, when=lambda checkpoint: True) -> None:
    """torch.save writes part of the file, then fails as a full disk does (when ``when``)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if not when(obj):
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_what_was_needed(saved, monkeypatch):
    before = saved.read_bytes()
    _full_disk(monkeypatch)
    big = {"state_dict": {"w": torch.zeros(512, 512)}, "global_step": 4}  # 1 MiB
    with pytest.raises(DiskFullError) as error:
        AtomicCheckpointIO().save_checkpoint(big, saved)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{saved}: no space left on device")
    assert "needs about 1.0 MiB" in message and f"free in {saved.parent}" in message
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["last.ckpt"]
    assert AtomicCheckpointIO().load_checkpoint(saved)["global_step"] == 3


def test_a_full_disk_at_a_periodic_checkpoint_logs_one_line_and_training_goes_on(
    compose_cfg, monkeypatch, caplog
):
    """FAST_TRAIN validates (and writes the best checkpoint) at steps 2 and 4; last.ckpt is
    due after every step, and the disk is full for the writes after steps 1 and 3."""
    _full_disk(
        monkeypatch, when=lambda ckpt: isinstance(ckpt, dict) and ckpt.get("global_step") in (1, 3)
    )
    cfg = compose_cfg(
        *FAST_TRAIN, "logger=none", "callbacks.resume_checkpoint.every_n_train_steps=1"
    )
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["global_step"] == 4
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and all("no space left on device" in e for e in errors)
    assert all(e.endswith("training goes on") and "last.ckpt" in e for e in errors)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert AtomicCheckpointIO().load_checkpoint(last)["global_step"] == 4


def test_a_full_disk_during_export_leaves_nothing_behind(compose_cfg, tmp_path, monkeypatch):
    import safetensors.torch
    from helpers.checkpoints import lora_checkpoint

    from sa2va.training.export import export

    _, ckpt = lora_checkpoint(compose_cfg, tmp_path)
    out = tmp_path / "export"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    with pytest.raises(DiskFullError, match=rf"^{out}: no space left on device .* needs about"):
        export(ckpt, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.ckpt"]


# ------------------------------------------------------------------ data order


class _Indices(Dataset):
    """Ten samples that are their own index (the sampler hands ``(epoch, index)``)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key: tuple[int, int]) -> int:
        return key[1]


def _loader(seed: int = 0) -> ResumableDataLoader:
    data = _Indices()
    return ResumableDataLoader(data, batch_size=3, sampler=ResumableSampler(data, seed=seed))


def _epoch(loader: ResumableDataLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


def test_order_is_fixed_per_epoch_and_differs_between_epochs():
    loader = _loader()
    first = _epoch(loader, 0)
    assert first == _epoch(_loader(), 0) and first != _epoch(loader, 1)
    assert sorted(i for batch in first for i in batch) == list(range(10))
    assert first != _epoch(_loader(seed=1), 0)


def test_a_restored_loader_continues_the_interrupted_epoch():
    loader = _loader()
    loader.sampler.set_epoch(2)
    seen = []
    for batch in loader:
        seen.append(batch.tolist())
        if len(seen) == 2:
            state = loader.state_dict()
            break
    assert state == {"epoch": 2, "batches": 2}
    restored = _loader()
    restored.load_state_dict(state)
    rest = _epoch(restored, 2)
    assert seen + rest == _epoch(_loader(), 2)
    assert restored.state_dict() == {"epoch": 2, "batches": 4}
    assert len(_epoch(restored, 3)) == 4  # the skip applies to the interrupted epoch only


def test_the_sampler_tells_the_dataset_the_epoch():
    sampler = ResumableSampler(_Indices(), seed=0)
    sampler.set_epoch(3)
    assert {epoch for epoch, _ in sampler} == {3}


def test_flips_are_a_function_of_seed_epoch_and_index_only():
    """Not of the global generators or of a worker's stream: a resumed run, or one with
    another data.num_workers, flips the same samples."""
    dataset = OCTClipDataset([[]] * 50, hflip_prob=0.5, augment_seed=7)
    torch.manual_seed(0)
    flips = [dataset.flips(epoch, i) for epoch in (0, 1) for i in range(50)]
    torch.manual_seed(1), np.random.seed(1)
    assert flips == [dataset.flips(epoch, i) for epoch in (0, 1) for i in range(50)]
    assert 30 < sum(flips) < 70 and flips[:50] != flips[50:]  # random, and new each epoch
    other_seed = OCTClipDataset([[]] * 50, hflip_prob=0.5, augment_seed=8)
    assert flips[:50] != [other_seed.flips(0, i) for i in range(50)]
    assert not any(OCTClipDataset([[]] * 50).flips(0, i) for i in range(50))


def test_a_restored_loader_starts_a_later_epoch_in_full():
    restored = _loader()
    restored.load_state_dict({"epoch": 1, "batches": 4})  # saved at the end of epoch 1
    assert _epoch(restored, 2) == _epoch(_loader(), 2)


# ------------------------------------------------------------------ RNG state


def test_rng_state_is_restored_at_the_first_training_batch_and_validation_is_neutral():
    callback = RNGState()
    torch.manual_seed(3)
    saved = callback.state_dict()
    expected = torch.rand(1)
    callback.load_state_dict(saved)
    torch.rand(5)  # a restart draws while it builds the model and the loaders
    callback.on_train_batch_start()
    assert torch.equal(torch.rand(1), expected)
    before = torch.get_rng_state()
    callback.on_validation_start()
    torch.rand(5)
    callback.on_validation_end()
    assert torch.equal(torch.get_rng_state(), before)


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
