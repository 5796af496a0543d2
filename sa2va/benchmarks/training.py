"""Training benchmarks: Lightning's loop vs a bare one, the feature cache, throughput."""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from sa2va.benchmarks.harness import (
    BareLoop,
    Bench,
    Measure,
    Results,
    Row,
    StepRecorder,
    interleave,
    loss_diff,
    repeated_loader,
)


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
        # the cache serves unaugmented frames only: the default run augments its clips
        data_cfg = {**OmegaConf.to_container(bench.cfg.data), "augment": None}
        cfg = bench.config(freeze=opts.freeze, module=module_cfg, data=data_cfg)

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
