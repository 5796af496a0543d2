"""The benchmark harness and its rows: interleaved timing of a command against its peer, with a
goal per ratio."""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
import platform
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from sa2va.data.datamodule import load_rgb
from sa2va.inference.video import segment_video
from sa2va.model.sa2va import batch_to_device
from sa2va.model.sam2 import upsample
from sa2va.overrides import hydra_overrides
from sa2va.training.module import Sa2VAModule
from sa2va.training.run import build, build_trainer
from sa2va.utils import atomic_write_bytes, atomic_write_json, git_sha

log = logging.getLogger(__name__)

CLOCKS = {"wall": "wall clock", "cpu": "this process's CPU time (data waits: wall clock)"}
DOC_BEGIN = "<!-- sa2va.bench:begin -->"
DOC_END = "<!-- sa2va.bench:end -->"
# Config nodes a memory-probe subprocess needs (resolved to plain values in the parent).
CHILD_KEYS = (
    "seed", "model", "loss", "freeze", "optim", "data", "module", "trainer", "logger", "callbacks",
    "paths",
)  # fmt: skip


# --------------------------------------------------------------------- results


@dataclass
class Row:
    """One comparison: medians of variants A and B and their ratio A/B."""

    section: str
    name: str  # "A / B"
    a: float
    b: float
    unit: str
    goal: str | None = None  # "<= 1.05", ">= 3"
    identical: bool | None = None  # None: the variants compute different things
    note: str = ""
    ratio: float = field(init=False)
    met: bool | None = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.a / self.b if self.b else float("inf")
        self.met = None
        if self.goal:
            op, value = self.goal.split()
            if op not in ("<=", ">="):
                raise ValueError(f"goal {self.goal!r}: write '<= x' or '>= x'")
            self.met = self.ratio <= float(value) if op == "<=" else self.ratio >= float(value)


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


# --------------------------------------------------------------------- sections


def bench_train_loop(bench: Bench) -> Results:
    """Lightning's fit loop vs a bare loop: per-step time between consecutive batch starts."""
    opts = bench.opts.train_loop
    warm, steps = int(opts.warmup_steps), int(opts.steps)
    total = warm + steps + 1  # the last batch only marks the end of the timed span
    module, datamodule = bench.build()
    batch = bench.first_batch(datamodule)
    initial = copy.deepcopy(module.state_dict())
    loader = repeated_loader(batch, total)
    startup: list[float] = []

    def per_step(starts: list[float]) -> float:
        return (starts[warm + steps] - starts[warm]) / steps

    def lightning() -> tuple[float, list[torch.Tensor]]:
        module.load_state_dict(initial)
        recorder = StepRecorder(bench.clock)
        trainer = bench.trainer(bench.cfg, [recorder], max_steps=total, max_epochs=-1)
        begin = bench.clock()
        trainer.fit(module, train_dataloaders=loader)
        startup.append(recorder.starts[0] - begin)
        return per_step(recorder.starts), recorder.losses

    def bare() -> tuple[float, list[torch.Tensor]]:
        module.load_state_dict(initial)
        module.model.train()
        loop = BareLoop(bench, module, total)
        starts, losses = [], []
        for b in loader:
            starts.append(bench.clock())
            losses.append(loop.step(b))
        return per_step(starts), losses

    medians, outputs = interleave(
        {"lightning": lightning, "bare": bare}, bench.repeats, bench.warmup
    )
    diff = loss_diff(outputs["lightning"], outputs["bare"])
    note = (
        f"{steps} timed steps after {warm} warm-up steps, batch {len(batch['masks'])}; "
        f"max |loss difference| {diff:.2e} over {total} steps; "
        f"logging every {bench.cfg.trainer.log_every_n_steps} steps "
        f"({', '.join(bench.cfg.logger or {}) or 'no logger'}); "
        f"fit start-up before the first step, not in the ratio: "
        f"{statistics.median(startup):.3f} s"
    )
    row = Row(
        "train_loop",
        "Lightning fit / bare PyTorch loop, s per step",
        medians["lightning"],
        medians["bare"],
        "s/step",
        goal="<= 1.05",
        identical=diff <= float(bench.opts.loss_atol),
        note=note,
    )
    return Results(rows=[row])


def bench_data(bench: Bench) -> Results:
    """The data set vs raw JPEG decode per sample (with its stages); data wait vs model time
    per training step for each worker count."""
    opts = bench.opts.data
    module, datamodule = bench.build()
    processor = module.model.processor
    dataset = datamodule.dataset("train")
    clips = dataset.clips[: int(opts.samples)]
    frames = [[load_rgb(r.image_path) for r in clip] for clip in clips]
    names = [clip[0].object_names for clip in clips]
    mask_hw = (int(processor.mask_size),) * 2

    def decode() -> None:
        for clip in clips:
            for record in clip:
                with Image.open(record.image_path) as image:
                    image.convert("RGB")

    def rasterise() -> None:
        for clip, objects in zip(clips, names, strict=True):
            [[r.mask(n, mask_hw) for n in objects] for r in clip]

    def process() -> None:
        for clip_frames, objects in zip(frames, names, strict=True):
            prompts = [dataset.prompt_template.format(name=n) for n in objects]
            answers = [dataset.answer_template.format(name=n) for n in objects]
            processor(clip_frames, prompts, answers)

    stages = {
        "pipeline": lambda: [dataset[i] for i in range(len(clips))],
        "decode": decode,
        "rasterise": rasterise,
        "processor": process,
    }
    medians, _ = interleave(
        {k: per_item(bench.clock, fn, len(clips)) for k, fn in stages.items()},
        bench.repeats,
        bench.warmup,
    )
    ms = {k: f"{1e3 * v:.2f} ms" for k, v in medians.items()}
    rows = [
        Row(
            "data",
            "data set sample / raw JPEG decode of its frames, s per sample",
            medians["pipeline"],
            medians["decode"],
            "s/sample",
            note=(
                f"{1 / medians['pipeline']:.0f} vs {1 / medians['decode']:.0f} samples/s in one "
                f"process; {sum(map(len, clips)) / len(clips):.0f} frame(s) per sample; per "
                f"sample: decode {ms['decode']}, rasterise masks at {mask_hw[0]} px "
                f"{ms['rasterise']}, processor (InternVL tiles, SAM2 view at "
                f"{processor.sam2_image_size} px, tokens) {ms['processor']}"
            ),
        )
    ]
    loop = BareLoop(bench, module, total_steps=10**6)
    module.model.train()
    for workers in opts.workers if opts.workers is not None else [datamodule.num_workers]:
        datamodule.num_workers = int(workers)
        data_wait, model_time = [], []
        for _ in range(bench.repeats):
            loader = datamodule.train_dataloader()
            waits, models = loader_loop(bench.wall, loader, loop, int(opts.steps))
            data_wait.append(statistics.median(waits))
            model_time.append(statistics.median(models))
        rows.append(
            Row(
                "data",
                f"data wait / model step with {workers} worker(s), s per training step",
                statistics.median(data_wait),
                statistics.median(model_time),
                "s/step",
                goal="<= 0.1",
                note=(
                    f"batch {datamodule.batch_size}; wait = time in next(dataloader) inside a "
                    "training loop (with 0 workers: the whole pipeline, in the training process)"
                ),
            )
        )
    return Results(rows=rows)


def per_item(clock: Clock, fn: Callable[[], Any], items: int) -> Callable[[], tuple[float, Any]]:
    """A variant for :func:`interleave`: seconds per item of one call of ``fn``, its output."""

    def timed() -> tuple[float, Any]:
        seconds, out = clock.seconds(fn)
        return seconds / items, out

    return timed


def loader_loop(
    clock: Clock, loader: DataLoader, loop: BareLoop, steps: int
) -> tuple[list[float], list[float]]:
    """Seconds spent in ``next(loader)`` and in the training step, per step, after one
    warm-up step (which also lets workers fill their queues)."""
    iterator = iter(loader)
    loop.step(next(iterator))
    waits, models = [], []
    for _ in range(steps):
        start = clock()
        batch = next(iterator, None)
        if batch is None:
            break
        fetched = clock()
        loop.step(batch)
        waits.append(fetched - start)
        models.append(clock() - fetched)
    return waits, models


def learn_answer(model: torch.nn.Module, batch: Mapping[str, Any], steps: int) -> None:
    """Teach the tiny random LM the fixed answer (LM loss only), so ``generate`` writes it."""
    optimizer = torch.optim.AdamW(model.mllm.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model.seg_embeddings(batch)[0].backward()
        optimizer.step()
    model.eval()


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b, strict=True))


def bench_inference(bench: Bench) -> Results:
    """Predict modes, batching and video modes on a short test video."""
    opts = bench.opts.inference
    module, datamodule = bench.build()
    model = module.model
    learn_answer(model, bench.first_batch(datamodule), int(opts.lm_steps))
    records = next(iter(datamodule.videos("test").values()))[: int(opts.frames)]
    frames = [load_rgb(r.image_path) for r in records]
    name = records[0].object_names[0]
    prompt = datamodule.prompt_template.format(name=name)
    answer = datamodule.answer_template.format(name=name)
    n, batch_size = len(frames), int(opts.batch_size)
    rows = []

    def predict(mode: str) -> Callable[[], tuple[float, list[dict[str, Any]]]]:
        def run() -> list[dict[str, Any]]:
            return [
                model.predict_forward(
                    [f], [prompt], mode=mode, answer=answer, max_new_tokens=opts.max_new_tokens
                )
                for f in frames
            ]

        return per_item(bench.clock, run, n)

    medians, outputs = interleave(
        {"generate": predict("generate"), "fast": predict("fast")}, bench.repeats, bench.warmup
    )
    texts = {o["text"][0] for o in outputs["generate"]}
    same = texts == {answer} and all(
        torch.equal(g["masks"], f["masks"])
        for g, f in zip(outputs["generate"], outputs["fast"], strict=True)
    )
    rows.append(
        Row(
            "inference",
            "generate / fast, s per frame",
            medians["generate"],
            medians["fast"],
            "s/frame",
            goal=">= 3",
            identical=same,
            note=f"generated answers {sorted(texts)} (fast uses {answer!r}); "
            f"LM taught the answer in {opts.lm_steps} steps first",
        )
    )

    def video(video_mode: str, size: int) -> Callable[[], tuple[float, list[torch.Tensor]]]:
        def run() -> list[torch.Tensor]:
            return segment_video(
                model, frames, [prompt], answer, video_mode=video_mode, batch_size=size,
                key_frames=int(opts.key_frames),
            ).logits  # fmt: skip

        return per_item(bench.clock, run, n)

    medians, outputs = interleave(
        {"batch1": video("per_frame", 1), "batchN": video("per_frame", batch_size)},
        bench.repeats,
        bench.warmup,
    )
    diff = _max_diff(outputs["batch1"], outputs["batchN"])
    rows.append(
        Row(
            "inference",
            f"per_frame batch 1 / batch {batch_size}, s per frame",
            medians["batch1"],
            medians["batchN"],
            "s/frame",
            identical=diff <= float(opts.atol),
            note=f"max |logit difference| {diff:.2e} (identical within {opts.atol})",
        )
    )

    with torch.no_grad():
        inputs, _ = model.prepare_inputs([frames[0]], [prompt], answer=answer)
        prompts = model.seg_embeddings(inputs)[1]

    def sam2_alone() -> list[torch.Tensor]:
        logits = []
        for start in range(0, n, batch_size):
            chunk = frames[start : start + batch_size]
            images = torch.stack([model.processor.sam2_view(f) for f in chunk]).to(bench.device)
            features = model.sam2.image_features(images)
            decoded = model.sam2.decode_language(features, prompts.expand(len(chunk), -1))
            masks = decoded.low_res_masks[:, 0]
            logits += list(upsample(masks, model.processor.mask_size).unsqueeze(1))
        return logits

    with torch.no_grad():
        medians, _ = interleave(
            {
                "propagate": video("propagate", batch_size),
                "per_frame": video("per_frame", batch_size),
                "sam2": per_item(bench.clock, sam2_alone, n),
            },
            bench.repeats,
            bench.warmup,
        )
    video_note = f"{n} frames, batch {batch_size}, {opts.key_frames} key frame(s)"
    rows.append(
        Row(
            "inference",
            "video propagate / per_frame, s per frame",
            medians["propagate"],
            medians["per_frame"],
            "s/frame",
            note=video_note,
        )
    )
    rows.append(
        Row(
            "inference",
            "video propagate / SAM2 image encoder + mask decoder alone, s per frame",
            medians["propagate"],
            medians["sam2"],
            "s/frame",
            goal="<= 1.3",
            note=video_note + "; both from PIL frames (SAM2 view included), same [SEG] prompt",
        )
    )
    return Results(rows=rows)


@dataclass
class EpochRun:
    """One fit of the feature-cache comparison."""

    first: float  # epoch 1, s
    later: float  # mean of epochs 2+, s
    step: float  # mean training step of epochs 2+ without data loading, s
    losses: list[torch.Tensor]


def bench_feature_cache(bench: Bench) -> Results:
    """Whole epochs with frozen encoders, the cache on vs off (same seed, same batches)."""
    opts = bench.opts.feature_cache
    epochs = int(opts.epochs)
    if epochs < 2:
        raise ValueError("bench.feature_cache.epochs must be >= 2 (the cache pays from epoch 2)")
    stats: dict[str, Any] = {}

    def variant(cache: bool) -> Callable[[], EpochRun]:
        module_cfg = {**OmegaConf.to_container(bench.cfg.module), "feature_cache": False}
        if cache:
            module_cfg["feature_cache"] = {"max_gb": float(opts.max_gb)}
        cfg = bench.config(freeze=opts.freeze, module=module_cfg)

        def fit() -> EpochRun:
            module, datamodule = bench.build(cfg)
            recorder = StepRecorder(bench.clock)
            trainer = bench.trainer(cfg, [recorder], max_epochs=epochs, max_steps=-1)
            trainer.fit(module, datamodule=datamodule)
            if cache:
                kept = module.model.feature_cache
                stats.update(kept.stats, entries=len(kept), mb=kept.nbytes / 2**20)
            times = [e - s for s, e in zip(recorder.epoch_starts, recorder.epoch_ends, strict=True)]
            per_epoch = len(recorder.losses) // epochs
            steps = [e - s for s, e in zip(recorder.starts, recorder.ends, strict=True)]
            return EpochRun(
                first=times[0],
                later=statistics.mean(times[1:]),
                step=statistics.mean(steps[per_epoch:]),
                losses=recorder.losses,
            )

        return fit

    variants = {"on": variant(True), "off": variant(False)}
    for _ in range(bench.warmup):
        for fit in variants.values():
            fit()
    runs: dict[str, list[EpochRun]] = {"on": [], "off": []}
    for round_ in range(bench.repeats):
        for name in list(variants) if round_ % 2 == 0 else reversed(list(variants)):
            runs[name].append(variants[name]())
    reference = runs["on"][0].losses
    diff = max(loss_diff(reference, run.losses) for group in runs.values() for run in group)
    same = diff <= float(bench.opts.loss_atol)

    def median(name: str, field: str) -> float:
        return statistics.median(getattr(run, field) for run in runs[name])

    note = (
        f"freeze={opts.freeze.name}; {len(reference) // epochs} steps per epoch, data loaded in "
        f"the training process (data.num_workers={bench.cfg.data.num_workers}); max |loss "
        f"difference| {diff:.2e} across all runs; cache {stats.get('entries', 0)} entries, "
        f"{stats.get('mb', 0.0):.1f} MiB, {stats.get('hits', 0)} hits / "
        f"{stats.get('misses', 0)} misses in the last run"
    )
    comparisons = [
        ("cache on: epochs 2+ / epoch 1, s per epoch", "later", "on", "first", "on", note),
        ("epochs 2+: cache on / off, s per epoch", "later", "on", "later", "off", ""),
        ("epoch 1: cache on (filling it) / off, s per epoch", "first", "on", "first", "off", ""),
        ("epochs 2+: training step without data loading, cache on / off, s per step",
         "step", "on", "step", "off", "from batch start to batch end (Lightning hooks)"),
    ]  # fmt: skip
    return Results(
        rows=[
            Row(
                "feature_cache",
                name,
                median(a_name, a_field),
                median(b_name, b_field),
                "s",
                identical=same,
                note=n,
            )
            for name, a_field, a_name, b_field, b_name, n in comparisons
        ]
    )


# ---- memory: one subprocess per variant ------------------------------------------------------


def _status_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` (peak) of this process from /proc, in MiB (None off Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return None


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory_probe(
    config: dict[str, Any], variant: str, device: str, steps: int, threads: int | None = None
) -> dict[str, float]:
    """Runs in a fresh process: build the model and one batch, then ``steps`` of ``variant``.

    Returns the RSS before the steps, the peak RSS during them (where the peak mark can be
    reset, else the process peak), the process peak from ``getrusage`` and, on CUDA, the peak
    allocated GPU memory; all in MiB.
    """
    timing = {"repeats": 1, "warmup": 0, "clock": "wall", "progress_bar": False}
    cfg = OmegaConf.create({**config, "bench": {"device": device, **timing}})
    if threads:
        torch.set_num_threads(threads)
    bench = Bench(cfg)
    module, datamodule = bench.build()
    batch = bench.first_batch(datamodule)
    before = _status_mb("VmRSS") or 0.0
    reset = _reset_peak_rss()
    if variant == "bare":
        loop = BareLoop(bench, module, steps)
        module.model.train()
        for _ in range(steps):
            loop.step(batch)
    elif variant == "lightning":
        trainer = bench.trainer(cfg, [], max_steps=steps, max_epochs=-1)
        trainer.fit(module, train_dataloaders=repeated_loader(batch, steps))
    elif variant == "predict":
        module.model.eval()
        with torch.no_grad():
            for _ in range(steps):
                module.model(batch)
    else:
        raise ValueError(f"bench.memory.variants: unknown variant {variant!r}")
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    out = {
        "before_mb": before,
        "steps_peak_mb": (_status_mb("VmHWM") if reset else None) or process_peak,
        "process_peak_mb": process_peak,
    }
    if bench.device.type == "cuda":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(bench.device) / 2**20
    return out


def bench_memory(bench: Bench) -> Results:
    """Peak memory of training and inference steps, each variant in a fresh interpreter."""
    opts = bench.opts.memory
    config = OmegaConf.to_container(
        OmegaConf.masked_copy(bench.cfg, list(CHILD_KEYS)), resolve=True
    )
    results = Results()
    spawn = get_context("spawn")  # a fresh interpreter per variant: peaks never mix
    probes = {}
    for variant in opts.variants:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            probes[variant] = probe = pool.submit(
                memory_probe,
                config,
                variant,
                str(bench.device),
                int(opts.steps),
                bench.opts.threads,
            ).result()
        growth = probe["steps_peak_mb"] - probe["before_mb"]
        figures = [
            ("RSS before the steps (model, data, one batch)", probe["before_mb"], ""),
            (f"peak RSS during {opts.steps} steps", probe["steps_peak_mb"], f"+{growth:.0f} MiB"),
            (
                "process peak RSS (getrusage)",
                probe["process_peak_mb"],
                "imports and build included",
            ),
        ]
        if "gpu_peak_mb" in probe:
            figures.append(("peak allocated GPU memory", probe["gpu_peak_mb"], ""))
        results.measures += [
            Measure("memory", f"{variant}: {name}", value, "MiB", note)
            for name, value, note in figures
        ]
    if {"lightning", "bare"} <= set(probes):
        growth = {k: probes[k]["steps_peak_mb"] - probes[k]["before_mb"] for k in probes}
        results.rows.append(
            Row(
                "memory",
                "training-step memory (peak RSS over the RSS before the steps), Lightning / bare",
                growth["lightning"],
                growth["bare"],
                "MiB",
                note=f"{opts.steps} steps each, one subprocess per variant",
            )
        )
    return results


def bench_throughput(bench: Bench) -> Results:
    """Training throughput of the composed model (e.g. ``model=sa2va_8b`` on a GPU)."""
    opts = bench.opts.throughput
    module, datamodule = bench.build()
    batch = bench.first_batch(datamodule)
    steps = int(opts.steps)
    loop = BareLoop(bench, module, total_steps=steps * (bench.repeats + bench.warmup) + 1)
    module.model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        loop.step(batch)
    flops = counter.get_total_flops()

    def run() -> tuple[float, None]:
        seconds, _ = bench.clock.seconds(lambda: [loop.step(batch) for _ in range(steps)])
        return seconds / steps, None

    medians, _ = interleave({"step": run}, bench.repeats, bench.warmup)
    step = medians["step"]
    samples = len(batch["masks"])
    tokens = int(batch["attention_mask"].sum())
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.model.parameters())
    label = bench.cfg.model.get("name", "model")
    where = "" if bench.device.type == "cuda" else "; CPU: indicative only"
    figures = [
        ("training step", step, "s", f"batch {samples}{where}"),
        ("samples/s", samples / step, "samples/s", ""),
        ("tokens/s", tokens / step, "tokens/s", f"{tokens} tokens per batch"),
        ("FLOPs per step", flops, "FLOP", "torch.utils.flop_counter, forward + backward"),
        ("achieved", flops / step / 1e12, "TFLOP/s", ""),
        ("parameters", total, "params", f"{trainable:,} trainable (freeze={module.freeze.name})"),
    ]
    if opts.peak_tflops:
        mfu = flops / step / (float(opts.peak_tflops) * 1e12)
        figures.append(("MFU", mfu, "", f"peak {opts.peak_tflops} TFLOP/s"))
    return Results(
        measures=[Measure("throughput", f"{label}: {n}", v, u, note) for n, v, u, note in figures]
    )


SECTIONS: dict[str, Callable[[Bench], Results]] = {
    "train_loop": bench_train_loop,
    "data": bench_data,
    "inference": bench_inference,
    "feature_cache": bench_feature_cache,
    "memory": bench_memory,
    "throughput": bench_throughput,
}


# --------------------------------------------------------------------- report


def machine(device: torch.device) -> dict[str, Any]:
    """Where the numbers came from."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def markdown(report: Mapping[str, Any]) -> str:
    m = report["machine"]
    gpu = f", GPU {m['gpu']}" if "gpu" in m else " (no GPU)"
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['memory_gb']} GiB{gpu}; "
        f"{m['torch_threads']} torch thread(s); torch {m['torch']}, lightning {m['lightning']}, "
        f"Python {m['python']}; load average "
        f"{report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after.",
        "",
        f"Run {report['date']} at git {report['git_sha'] or 'unknown'}: medians over "
        f"{report['repeats']} interleaved rounds after {report['warmup']} warm-up round(s); "
        f"times: {CLOCKS[report['clock']]}; ratio = A / B.",
        "",
    ]
    if report["rows"]:
        lines += [
            "| section | A / B | A | B | unit | ratio | goal | met | identical |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["rows"]:
            flag = {True: "yes", False: "**no**", None: "-"}
            lines.append(
                f"| {r['section']} | {r['name']} | {_fmt(r['a'])} | {_fmt(r['b'])} | {r['unit']} "
                f"| **{r['ratio']:.3g}** | {r['goal'] or '-'} | {flag[r['met']]} "
                f"| {flag[r['identical']]} |"
            )
        lines += ["", "Notes:", ""]
        lines += [
            f"- {r['section']}, {r['name']}: {r['note']}" for r in report["rows"] if r["note"]
        ]
    if report["measures"]:
        lines += ["", "| section | measure | value | unit | note |", "|---|---|---|---|---|"]
        lines += [
            f"| {x['section']} | {x['name']} | {_fmt(x['value'])} | {x['unit']} | {x['note']} |"
            for x in report["measures"]
        ]
    return "\n".join(lines) + "\n"


def update_doc(path: Path, fragment: str) -> None:
    """Replace the text between the bench markers of ``path`` (create the file if needed)."""
    block = f"{DOC_BEGIN}\n{fragment}{DOC_END}\n"
    text = path.read_text() if path.is_file() else ""
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        tail = rest.split(DOC_END, 1)[1]
        text = head + block + tail.removeprefix("\n")  # the block brought its own newline
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block
    atomic_write_bytes(path, text.encode())


def print_table(report: Mapping[str, Any]) -> None:
    for r in report["rows"]:
        goal = f"  goal {r['goal']}: {'met' if r['met'] else 'NOT met'}" if r["goal"] else ""
        same = {True: "  identical", False: "  DIFFERENT", None: ""}[r["identical"]]
        print(f"[{r['section']}] {r['name']}: {r['ratio']:.3g}x{goal}{same}")
    for x in report["measures"]:
        print(f"[{x['section']}] {x['name']}: {_fmt(x['value'])} {x['unit']}")


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads (None: leave torch's choice)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Per-fit banners (Lightning's, the module's parameter table, the data summary) and the
    single-process DataLoader hints would bury the table."""
    names = ("lightning.pytorch", "lightning.fabric", "sa2va.module", "sa2va.data.datamodule")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for message in (
            "does not have many workers",
            "smaller than the logging interval",
            "no `val_dataloader`",
            "Experiment logs directory",
            "isinstance.treespec, LeafSpec",
        ):
            warnings.filterwarnings("ignore", message=f".*{message}.*")
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def run_bench(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured sections; write bench.json / bench.md (and ``bench.doc``)."""
    bench = Bench(cfg)
    unknown = set(cfg.bench.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"bench.sections: unknown {sorted(unknown)}; choose from {list(SECTIONS)}")
    load_before = os.getloadavg()
    results = Results()
    wall: dict[str, float] = {}
    with _quiet(), _threads(cfg.bench.threads):
        info = machine(bench.device)
        for name in cfg.bench.sections:
            log.info("bench section %s", name)
            start = time.perf_counter()
            part = SECTIONS[name](bench)
            wall[name] = round(time.perf_counter() - start, 1)
            results.rows += part.rows
            results.measures += part.measures
    report = {
        "command": " ".join(["python -m sa2va.bench", *hydra_overrides()]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "machine": info,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "repeats": bench.repeats,
        "warmup": bench.warmup,
        "clock": bench.clock.kind,
        "section_seconds": wall,
        "rows": [asdict(r) for r in results.rows],
        "measures": [asdict(m) for m in results.measures],
    }
    fragment = markdown(report)
    atomic_write_json(bench.output_dir / "bench.json", report)
    atomic_write_bytes(bench.output_dir / "bench.md", fragment.encode())
    if cfg.bench.doc:
        update_doc(Path(cfg.bench.doc), fragment)
    print_table(report)
    return report
