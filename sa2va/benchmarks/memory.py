"""Memory benchmarks: peak RSS (and GPU memory) of each variant in a fresh interpreter."""

from __future__ import annotations

import contextlib
import resource
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from sa2va.benchmarks.harness import (
    BareLoop,
    Bench,
    Measure,
    Results,
    Row,
    repeated_loader,
)

# Config nodes a memory-probe subprocess needs (resolved to plain values in the parent).
CHILD_KEYS = (
    "seed", "model", "loss", "freeze", "optim", "data", "module", "trainer", "logger", "callbacks",
    "paths",
)  # fmt: skip


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
