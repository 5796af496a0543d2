"""Training faults: a run that dies mid-epoch resumes from last.ckpt to exactly the
uninterrupted result; non-finite steps are skipped (weights untouched) or stop the run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.configs import FAST_DATA
from helpers.resume import RANDOM, RESUMABLE, assert_same_end, last_checkpoint_meta, uninterrupted
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, open_dict

from sa2va.training.checkpointing import AtomicCheckpointIO
from sa2va.training.run import build, train
from sa2va.utils import CONF_DIR, REPO_ROOT

CRASH_STEP = 5


def _check_resume(
    compose_cfg: Callable[..., DictConfig],
    tmp_path: Path,
    crash: Callable,
    overrides: tuple[str, ...] = (),
) -> None:
    """Uninterrupted run vs. crash (``crash(run_dir)``) + resume from the crashed run's
    last.ckpt, both with ``overrides``: same weights, optimiser and scheduler state (bit for
    bit) and same metrics."""
    full_summary, expected = uninterrupted(compose_cfg, overrides)

    crashed = tmp_path / "crashed"
    crash(crashed)
    assert last_checkpoint_meta(crashed)["global_step"] == CRASH_STEP - 1

    resumed = compose_cfg(*RESUMABLE, *overrides, f"ckpt_path={crashed}/checkpoints/last.ckpt")
    with open_dict(resumed):
        resumed.paths.output_dir = str(crashed)  # the same run dir, as documented
    assert_same_end(train(resumed), crashed, full_summary, expected)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param((), id="plain"),
        pytest.param(RANDOM, id="flip+dropout"),
        pytest.param((*RANDOM, "augment=strong"), id="augment"),
        pytest.param((*RANDOM, "data.num_workers=2"), id="workers2", marks=pytest.mark.slow),
        pytest.param(
            (*RANDOM, "trainer.accumulate_grad_batches=2"), id="accumulate2", marks=pytest.mark.slow
        ),
    ],
)
def test_crashed_run_resumes_to_the_uninterrupted_result(compose_cfg, tmp_path, overrides):
    def crash(run_dir: Path) -> None:
        cfg = compose_cfg(
            *RESUMABLE,
            *overrides,
            "+callbacks.crash._target_=tests.helpers.callbacks.CrashAt",
            f"+callbacks.crash.step={CRASH_STEP}",
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg)

    _check_resume(compose_cfg, tmp_path, crash, overrides)


@pytest.mark.slow
def test_sigkilled_process_resumes_to_the_uninterrupted_result(compose_cfg, tmp_path, cache_dir):
    def crash(run_dir: Path) -> None:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sa2va.train",
                *RESUMABLE,
                f"hydra.run.dir={run_dir}",
                f"paths.cache_dir={cache_dir}",
                "+callbacks.crash._target_=tests.helpers.callbacks.CrashAt",
                f"+callbacks.crash.step={CRASH_STEP}",
                "+callbacks.crash.sigkill=true",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    _check_resume(compose_cfg, tmp_path, crash)


@pytest.mark.slow
def test_two_process_ddp_run_resumes_to_the_uninterrupted_result(tmp_path, cache_dir):
    """2-process CPU DDP (gloo), flips and dropout on: each rank's generators come back."""

    def run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "sa2va.train", *RESUMABLE, *RANDOM, "trainer.devices=2",
                   "+trainer.strategy=ddp_find_unused_parameters_true",
                   f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}", *extra]  # fmt: skip
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)

    full_dir, crashed = tmp_path / "full", tmp_path / "crashed"
    full = run(full_dir)
    assert full.returncode == 0, full.stderr[-3000:]
    crash = run(crashed, "+callbacks.crash._target_=tests.helpers.callbacks.CrashAt",
                f"+callbacks.crash.step={CRASH_STEP}")  # fmt: skip
    assert crash.returncode != 0 and "simulated crash" in crash.stderr, crash.stderr[-3000:]
    assert last_checkpoint_meta(crashed)["global_step"] == CRASH_STEP - 1
    resumed = run(crashed, f"ckpt_path={crashed}/checkpoints/last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary, expected_summary = (
        json.loads((d / "metrics.json").read_text()) for d in (crashed, full_dir)
    )
    assert_same_end(summary, crashed, expected_summary, last_checkpoint_meta(full_dir))


# ------------------------------------------------------------------ non-finite steps


class Poison(L.Callback):
    """NaN loss at step ``loss_step`` and a NaN gradient (finite loss) at ``grad_step``;
    records the weights before and after every step."""

    def __init__(self, loss_step: int, grad_step: int) -> None:
        self.loss_step, self.grad_step = loss_step, grad_step
        self.weights: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self._handle = None

    def _snapshot(self, module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.weights[trainer.global_step, "before"] = self._snapshot(module)
        if trainer.global_step == self.loss_step:
            nan_loss = lambda mod, args, out: {**out, "loss": out["loss"] * float("nan")}  # noqa: E731
            self._handle = module.loss.register_forward_hook(nan_loss)
        elif trainer.global_step == self.grad_step:
            param = next(p for p in module.parameters() if p.requires_grad)
            self._handle = param.register_hook(lambda g: torch.full_like(g, float("nan")))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.weights[trainer.global_step - 1, "after"] = self._snapshot(module)
        self._unhook()

    def on_exception(self, trainer, module, exception) -> None:
        self._unhook()  # the module is shared with later tests

    def _unhook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple:
    """One tiny module and data module for the non-finite tests (built once)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=FAST_DATA)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.cache_dir = str(tmp_path_factory.mktemp("cache"))
    module, datamodule = build(cfg)
    return cfg, module, datamodule


def _fit(tiny: tuple, on_nonfinite: str, poison: Poison, max_steps: int) -> L.Trainer:
    cfg, module, datamodule = tiny
    module.on_nonfinite, module.skipped_steps = on_nonfinite, 0
    trainer = instantiate(
        cfg.trainer,
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        callbacks=[poison],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=cfg.paths.cache_dir,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_nonfinite_steps_are_skipped_and_counted_with_weights_unchanged(tiny):
    poison = Poison(loss_step=1, grad_step=2)
    trainer = _fit(tiny, "skip", poison, max_steps=4)
    module, weights = tiny[1], poison.weights
    assert module.skipped_steps == 2 and trainer.global_step == 4
    for step in (1, 2):  # NaN loss, then NaN gradient: nothing moves
        for name, value in weights[step, "before"].items():
            torch.testing.assert_close(weights[step, "after"][name], value, rtol=0, atol=0)
    for step in (0, 3):  # finite steps train, and no NaN got in
        after = weights[step, "after"]
        assert any(not torch.equal(after[n], v) for n, v in weights[step, "before"].items())
        assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    module.skipped_steps = 0
    module.on_load_checkpoint(checkpoint)  # a resumed run goes on counting
    assert module.skipped_steps == 2


@pytest.mark.parametrize(
    "poison, message",
    [
        (Poison(loss_step=0, grad_step=-1), r"non-finite loss at step 0 \(.*loss=nan"),
        (Poison(loss_step=-1, grad_step=0), r"non-finite gradient at step 0 \(1 tensors, first "),
    ],
    ids=["loss", "gradient"],
)
def test_nonfinite_step_stops_the_run_with_on_nonfinite_stop(tiny, poison, message):
    with pytest.raises(FloatingPointError, match=message + r".*on_nonfinite=skip"):
        _fit(tiny, "stop", poison, max_steps=1)


# ------------------------------------------------------------------ SLURM preemption


def test_slurm_trainer_requeues_into_the_same_run_dir(compose_cfg, monkeypatch):
    """trainer=slurm: SIGUSR1 -> preempted.ckpt in the run dir + requeue; the requeued job
    (same SLURM_JOB_ID) gets the same run dir, where train() finds that checkpoint."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = compose_cfg("trainer=slurm", "trainer.accelerator=cpu", "trainer.precision=32-true")
    assert cfg.hydra.run.dir == "outputs/train/slurm/4242"
    assert cfg.trainer.max_steps == compose_cfg("trainer=gpu").trainer.max_steps
    (environment,) = [
        p for p in instantiate(cfg.trainer.plugins) if isinstance(p, SLURMEnvironment)
    ]
    # Lightning's requeue handler (a save from inside the signal handler) is off: the
    # Preemption callback saves at a step boundary and requeues
    assert not environment.auto_requeue and cfg.callbacks.preemption.requeue
    trainer = instantiate(cfg.trainer, logger=False)  # Lightning takes both plugins
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
