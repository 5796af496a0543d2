"""Data benchmarks: the data set vs raw JPEG decode, data wait vs model time per step."""

from __future__ import annotations

import statistics

from PIL import Image
from torch.utils.data import DataLoader

from sa2va.benchmarks.harness import (
    BareLoop,
    Bench,
    Clock,
    Results,
    Row,
    interleave,
    per_item,
)
from sa2va.data.datamodule import load_rgb


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
