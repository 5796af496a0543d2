"""The benchmark harness: rows with a goal per ratio, interleaved timing of a variant against
its peer, and the building blocks the benchmark families share (seeded model, bare loop)."""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from sa2va.model.sa2va import batch_to_device
from sa2va.training.module import Sa2VAModule
from sa2va.training.run import build, build_trainer
from sa2va.utils import CONF_DIR


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """``conf/<name>.yaml`` with ``overrides``, inside a running Hydra app or outside one."""
    if GlobalHydra.instance().is_initialized():
        return compose(name, overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


# --------------------------------------------------------------------- results


@dataclass
class Row:
    """One comparison: medians of variants A and B and their ratio A/B."""

    section: str
    name: str  # "A / B"
    a: float
    b: float
    unit: str
    goal: str | None = None  # "<= 1.05", ">= 3", "within 0.1" (|ratio - 1| <= 0.1)
    identical: bool | None = None  # None: the variants compute different things
    note: str = ""
    ratio: float = field(init=False)
    met: bool | None = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.a / self.b if self.b else float("inf")
        self.met = None
        if self.goal:
            op, value = self.goal.split()
            checks = {
                "<=": lambda bound: self.ratio <= bound,
                ">=": lambda bound: self.ratio >= bound,
                "within": lambda bound: abs(self.ratio - 1) <= bound,
            }
            if op not in checks:
                raise ValueError(f"goal {self.goal!r}: write '<= x', '>= x' or 'within x'")
            self.met = checks[op](float(value))


@dataclass
class Measure:
    """An absolute figure (throughput, memory): meaningful on a GPU, indicative on a CPU."""

    section: str
    name: str
    value: float
    unit: str
    note: str = ""


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    measures: list[Measure] = field(default_factory=list)


# --------------------------------------------------------------------- timing


class Clock:
    """Wall time that waits for queued GPU work first (a CUDA kernel launch returns at once),
    or this process's CPU time (``kind="cpu"``: on a CPU shared with other jobs, and with one
    intra-op thread, it counts the work done rather than the waiting for a core)."""

    def __init__(self, device: torch.device, kind: str = "wall") -> None:
        if kind not in ("wall", "cpu"):
            raise ValueError(f"bench.clock must be 'wall' or 'cpu', got {kind!r}")
        if kind == "cpu" and device.type == "cuda":
            raise ValueError("bench.clock=cpu cannot time GPU work; use bench.clock=wall")
        self.device = device
        self.kind = kind

    def __call__(self) -> float:
        if self.kind == "cpu":
            return time.process_time()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def seconds(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        start = self()
        out = fn()
        return self() - start, out


def interleave(
    variants: Mapping[str, Callable[[], tuple[float, Any]]], repeats: int, warmup: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """Run each variant ``warmup`` times, then ``repeats`` rounds in alternating order.

    A variant returns (measurement, output). Returns the median measurement per variant and
    each variant's last output (for the "identical" checks).
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    values: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, Any] = {}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            values[name].append((result := variants[name]())[0])
            outputs[name] = result[1]
    return {name: statistics.median(v) for name, v in values.items()}, outputs


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast Lightning's precision plugin uses, for the bare loops."""
    precision = str(precision)
    if precision in ("32", "32-true"):
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"bench supports trainer.precision 32-true or bf16-mixed, got {precision!r}")


# --------------------------------------------------------------------- building blocks


class Bench:
    """Configuration and helpers shared by the sections."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.opts = cfg.bench
        self.device = torch.device(self.opts.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("bench.device=cuda but no CUDA device is available")
        self.clock = Clock(self.device, str(self.opts.clock))
        self.wall = Clock(self.device)  # waiting for data loader workers is not CPU time
        self.repeats = int(self.opts.repeats)
        self.warmup = int(self.opts.warmup)
        self.output_dir = Path(cfg.paths.output_dir)
        self.precision = str(cfg.trainer.precision)

    def config(self, base: DictConfig | None = None, **nodes: Any) -> DictConfig:
        """A copy of ``base`` (default: the composed config) with top-level nodes replaced."""
        cfg = copy.deepcopy(base or self.cfg)
        with open_dict(cfg):
            for key, value in nodes.items():
                if value is not None:
                    cfg[key] = value
        return cfg

    def build(self, cfg: DictConfig | None = None) -> tuple[Sa2VAModule, Any]:
        """Seeded module (on the bench device) and set-up data module.

        A real-size model is allowed without its pretrained files (``requires_pretrained``
        is lifted): it then has random weights and the tiny tokenizer, whose embeddings are
        padded to the configured vocabulary so that throughput and memory see the real
        embedding and LM-head sizes.
        """
        # speed and memory need the shape, not trained weights: random ones are allowed
        cfg = self.config(cfg, requires_pretrained=False)
        L.seed_everything(cfg.seed)
        with self.device:  # weights are created (and initialised) where they will run
            module, datamodule = build(cfg)
        mllm = cfg.model.get("mllm") or {}
        vocab_size = ((mllm.get("config") or {}).get("text_config") or {}).get("vocab_size")
        if mllm and mllm.get("path") is None and vocab_size:  # a real shape, random weights
            # new rows are random like the rest; transformers keeps requires_grad
            module.model.mllm.resize_token_embeddings(int(vocab_size), mean_resizing=False)
        datamodule.setup("fit")
        return module.to(self.device), datamodule

    def first_batch(self, datamodule: Any) -> dict[str, Any]:
        loader = datamodule.train_dataloader()
        return batch_to_device(next(iter(loader)), self.device)

    def trainer(self, cfg: DictConfig, callbacks: list[Callback], **overrides: Any) -> L.Trainer:
        """The configured Trainer (loggers and callbacks included) without validation or
        checkpoints, plus ``callbacks``."""
        trainer_cfg = {
            **OmegaConf.to_container(cfg.trainer),
            "accelerator": "gpu" if self.device.type == "cuda" else "cpu",
            "devices": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "enable_progress_bar": cfg.trainer.enable_progress_bar
            if self.opts.progress_bar is None
            else bool(self.opts.progress_bar),
            "enable_model_summary": False,
            "accumulate_grad_batches": 1,
            **overrides,
        }
        kept = {
            name: c
            for name, c in (cfg.callbacks or {}).items()
            if c is not None and not issubclass(get_class(c._target_), ModelCheckpoint)
        }
        cfg = self.config(cfg, trainer=trainer_cfg)
        with open_dict(cfg):
            cfg.callbacks = kept
        trainer = build_trainer(cfg, self.output_dir / "lightning")
        trainer.callbacks.extend(callbacks)
        return trainer


class BareLoop:
    """What Lightning runs for one training step of ``Sa2VAModule``, written out: forward,
    loss, backward, gradient clipping, optimiser and per-step scheduler steps."""

    def __init__(self, bench: Bench, module: Sa2VAModule, total_steps: int) -> None:
        self.module = module
        self.device = bench.device
        self.precision = bench.precision
        self.clip = bench.cfg.trainer.gradient_clip_val
        self.optimizer, self.scheduler = module.optim.build(
            module.model.named_parameters(), total_steps
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self, batch: Mapping[str, Any]) -> torch.Tensor:
        batch = batch_to_device(batch, self.device)
        with autocast(self.device, self.precision):
            out = self.module.model(batch)
            loss = self.module.loss(out.pred_masks, batch["masks"], out.lm_loss)["loss"]
        self.optimizer.zero_grad(set_to_none=True)  # before backward, as Lightning does
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, float(self.clip))
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()


class StepRecorder(Callback):
    """Start and end time of every training batch, its loss, and epoch boundaries."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.losses: list[torch.Tensor] = []
        self.epoch_starts: list[float] = []
        self.epoch_ends: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.starts.append(self.clock())

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, *args: Any) -> None:
        self.ends.append(self.clock())
        self.losses.append(outputs["loss"].detach())

    def on_train_epoch_start(self, *args: Any) -> None:
        self.epoch_starts.append(self.clock())

    def on_train_epoch_end(self, *args: Any) -> None:
        self.epoch_ends.append(self.clock())


def _same_batch(batch: Any) -> Any:
    return batch


def repeated_loader(batch: Mapping[str, Any], steps: int) -> DataLoader:
    """A DataLoader yielding the same collated batch ``steps`` times."""
    return DataLoader([batch] * steps, batch_size=None, collate_fn=_same_batch)


def loss_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference between two runs' per-step losses (inf: different lengths)."""
    if len(a) != len(b):
        return float("inf")
    return float((torch.stack(a).cpu() - torch.stack(b).cpu()).abs().max()) if a else 0.0


def per_item(clock: Clock, fn: Callable[[], Any], items: int) -> Callable[[], tuple[float, Any]]:
    """A variant for :func:`interleave`: seconds per item of one call of ``fn``, its output."""

    def timed() -> tuple[float, Any]:
        seconds, out = clock.seconds(fn)
        return seconds / items, out

    return timed


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference between two runs' tensors, pairwise (0 for empty ones)."""
    return max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b, strict=True))
