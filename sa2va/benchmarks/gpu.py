"""The GPU check (``bench=gpu``): the ``sa2va_8b`` architecture with random bf16 weights,
trained on one GPU under plain bf16 and DeepSpeed ZeRO-3, each at micro-batch 1 and 4 with
gradient checkpointing off and on; peak memory against ``sa2va.plan``'s prediction for the
same setting, step time, tokens/s and MFU.

The cases and their predictions are built first, on the CPU (the planner works on the meta
device); :func:`require_cuda` then refuses to go on without a GPU. The model itself is built
under the GPU device, so its random weights are materialised there without a CPU copy.
"""

from __future__ import annotations

import gc
import itertools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict
from torch.utils.flop_counter import FlopCounterMode

from sa2va.benchmarks.harness import (
    Bench,
    Measure,
    Results,
    Row,
    StepRecorder,
    compose_config,
    repeated_loader,
)
from sa2va.planning.report import plan
from sa2va.utils import atomic_write_json

log = logging.getLogger(__name__)

GIB = 2**30
TRAINERS = {"bf16": "gpu", "zero3": "deepspeed_stage_3"}  # strategy -> conf/trainer/<name>


@dataclass
class TrainCase:
    """One training setting of the GPU check and the planner's peak for it."""

    strategy: str  # a key of TRAINERS
    micro_batch: int
    checkpointing: bool
    overrides: list[str]  # the same for the planner and the run
    predicted_gib: float  # sa2va.plan's GPU total without its fixed overhead

    @property
    def label(self) -> str:
        ckpt = "on" if self.checkpointing else "off"
        return f"{self.strategy}, micro-batch {self.micro_batch}, checkpointing {ckpt}"


def train_cases(cfg: DictConfig) -> list[TrainCase]:
    """Every (strategy, micro-batch, checkpointing) of ``bench.gpu`` with its prediction.

    The planner's fixed overhead (CUDA context, allocator slack) is left out: the run
    measures ``torch.cuda.max_memory_allocated``, which does not see it either.
    """
    opts = cfg.bench.gpu
    cases = []
    for strategy, micro, ckpt in itertools.product(
        opts.strategies, opts.micro_batches, opts.checkpointing
    ):
        if strategy not in TRAINERS:
            raise ValueError(f"bench.gpu.strategies: unknown {strategy!r}; use {list(TRAINERS)}")
        overrides = [
            f"model={opts.model}",
            f"freeze={opts.freeze}",
            f"trainer={TRAINERS[strategy]}",
            "trainer.devices=1",
            f"data.batch_size={micro}",
            f"model.gradient_checkpointing={str(bool(ckpt)).lower()}",
            *opts.overrides,
        ]
        planned = plan(compose_config("plan", [*overrides, "plan.overhead_gb=0"]))
        (row,) = [r for r in planned["rows"] if r["selected"]]
        cases.append(TrainCase(strategy, int(micro), bool(ckpt), overrides, row["gpu_total"] / GIB))
    return cases


def require_cuda(cases: list[TrainCase]) -> None:
    """Refuse to start the GPU check without CUDA, saying what was prepared."""
    if torch.cuda.is_available():
        return
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    raise RuntimeError(
        f"bench=gpu needs a CUDA GPU, and torch {torch.__version__} ({build}) sees none. "
        f"Its plan is ready ({len(cases)} training cases with sa2va.plan's memory "
        "predictions, written to gpu_plan.json in the run directory); run it on a GPU "
        "machine: python -m sa2va.bench bench=gpu (or scripts/gpu_check.sh)"
    )


def bench_gpu(bench: Bench) -> Results:
    """Every training case in turn, one fresh model each, with its measures and a row
    comparing its peak memory with the prediction."""
    cases = train_cases(bench.cfg)
    results = Results()
    flops: dict[int, float] = {}  # per micro-batch, from the plain bf16 run
    for case in cases:
        rows, measures = _run_case(bench, case, flops)
        results.rows += rows
        results.measures += measures
    return results


def _run_case(
    bench: Bench, case: TrainCase, flops: dict[int, float]
) -> tuple[list[Row], list[Measure]]:
    opts = bench.opts.gpu
    capacity = torch.cuda.get_device_properties(bench.device).total_memory / GIB
    if case.predicted_gib > capacity:  # would only run out of memory: say so instead
        note = f"not run: predicted over this GPU's {capacity:.0f} GiB"
        skipped = Measure("gpu", f"{case.label}: predicted peak", case.predicted_gib, "GiB", note)
        return [], [skipped]
    cfg = compose_config("bench", [*case.overrides, "bench=gpu"])
    with open_dict(cfg):
        cfg.paths = bench.cfg.paths
    case_bench = Bench(cfg)
    gc.collect()  # the previous case's model and engine
    torch.cuda.empty_cache()
    module, datamodule = case_bench.build()
    batch = case_bench.first_batch(datamodule)
    if case.strategy == "bf16" and case.micro_batch not in flops:
        module.model.train()
        counter = FlopCounterMode(display=False)
        with counter, torch.autocast("cuda", dtype=torch.bfloat16):
            out = module.model(batch)
            module.loss(out.pred_masks, batch["masks"], out.lm_loss)["loss"].backward()
        module.model.zero_grad(set_to_none=True)
        flops[case.micro_batch] = counter.get_total_flops()
    warm, steps = int(opts.warmup_steps), int(opts.steps)
    total = warm + steps + 1
    recorder = StepRecorder(case_bench.clock)
    trainer = case_bench.trainer(cfg, [recorder], max_steps=total, max_epochs=-1)
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=repeated_loader(batch, total))
    peak = torch.cuda.max_memory_allocated() / GIB
    step = (recorder.starts[warm + steps] - recorder.starts[warm]) / steps
    tokens = int(batch["attention_mask"].sum())
    measures = [
        Measure("gpu", f"{case.label}: training step", step, "s", f"{steps} steps"),
        Measure("gpu", f"{case.label}: tokens/s", tokens / step, "tokens/s", f"{tokens} tokens"),
    ]
    if case.micro_batch in flops:
        mfu = flops[case.micro_batch] / step / (float(opts.peak_tflops) * 1e12)
        note = (
            "FLOPs of one forward + backward at this micro-batch (torch.utils.flop_counter, "
            f"first bf16 case run); peak {opts.peak_tflops} TFLOP/s"
        )
        measures.append(Measure("gpu", f"{case.label}: MFU", mfu, "", note))
    row = Row(
        "gpu",
        f"peak allocated memory / sa2va.plan's prediction, {case.label}",
        peak,
        case.predicted_gib,
        "GiB",
        goal=f"within {opts.memory_tolerance}",
        note=f"torch.cuda.max_memory_allocated over {total} Lightning steps; {case.overrides}",
    )
    del trainer, module
    return [row], measures


def prepare_gpu_check(cfg: DictConfig, path: Path) -> list[TrainCase]:
    """Build the cases and their predictions, write them to ``path`` (JSON), then refuse to
    go on without CUDA: on a CPU the check gets this far."""
    cases = train_cases(cfg)
    atomic_write_json(path, {"cases": [{**asdict(c), "label": c.label} for c in cases]})
    log.info("GPU check: %d training cases planned (%s)", len(cases), path)
    require_cuda(cases)
    return cases
