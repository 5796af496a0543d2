"""Run the configured benchmark sections and write the report."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sa2va.benchmarks.data import bench_data
from sa2va.benchmarks.generation import bench_generation
from sa2va.benchmarks.gpu import bench_gpu, prepare_gpu_check
from sa2va.benchmarks.harness import Bench, Results
from sa2va.benchmarks.inference import bench_inference
from sa2va.benchmarks.memory import bench_memory
from sa2va.benchmarks.propagation import bench_propagation, bench_sam2_compile
from sa2va.benchmarks.report import machine, markdown, print_table, update_doc
from sa2va.benchmarks.training import bench_feature_cache, bench_throughput, bench_train_loop
from sa2va.overrides import hydra_overrides
from sa2va.utils import atomic_write_bytes, atomic_write_json, git_sha

log = logging.getLogger(__name__)

SECTIONS: dict[str, Callable[[Bench], Results]] = {
    "train_loop": bench_train_loop,
    "data": bench_data,
    "inference": bench_inference,
    "generation": bench_generation,
    "propagation": bench_propagation,
    "sam2_compile": bench_sam2_compile,
    "feature_cache": bench_feature_cache,
    "memory": bench_memory,
    "throughput": bench_throughput,
    "gpu": bench_gpu,
}


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
    names = (
        "lightning.pytorch",
        "lightning.fabric",
        "sa2va.training.module",
        "sa2va.data.datamodule",
    )
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
    unknown = set(cfg.bench.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"bench.sections: unknown {sorted(unknown)}; choose from {list(SECTIONS)}")
    if "gpu" in cfg.bench.sections:  # its plan needs no GPU; it refuses to go on without one
        prepare_gpu_check(cfg, Path(cfg.paths.output_dir) / "gpu_plan.json")
    bench = Bench(cfg)
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
        update_doc(Path(cfg.bench.doc), fragment, cfg.bench.doc_block)
    print_table(report)
    return report
