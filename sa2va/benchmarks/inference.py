"""Inference benchmarks on the tiny model: predict modes, batching, video modes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from sa2va.benchmarks.harness import (
    Bench,
    Results,
    Row,
    interleave,
    max_diff,
    per_item,
)
from sa2va.data.datamodule import load_rgb
from sa2va.inference.video import segment_video
from sa2va.model.sam2 import upsample


def learn_answer(model: torch.nn.Module, batch: Mapping[str, Any], steps: int) -> None:
    """Teach the tiny random LM the fixed answer (LM loss only), so ``generate`` writes it."""
    optimizer = torch.optim.AdamW(model.mllm.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model.seg_embeddings(batch)[0].backward()
        optimizer.step()
    model.eval()


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
    diff = max_diff(*([o["masks"] for o in outputs[k]] for k in ("generate", "fast")))
    same = texts == {answer} and diff <= float(opts.atol)
    rows.append(
        Row(
            "inference",
            "generate / fast, s per frame",
            medians["generate"],
            medians["fast"],
            "s/frame",
            identical=same,
            note=f"generated answers {sorted(texts)} (fast uses {answer!r}); "
            f"LM taught the answer in {opts.lm_steps} steps first; max |mask logit "
            f"difference| {diff:.1e} (KV-cache rounding; identical within {opts.atol}); "
            "the goal is on the LLM-dominated shape (generation section)",
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
    diff = max_diff(outputs["batch1"], outputs["batchN"])
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
            note=video_note + "; both from PIL frames (SAM2 view included), same [SEG] prompt; "
            "no goal: SAM2VideoPredictor itself is further from this floor (propagation "
            "section)",
        )
    )
    return Results(rows=rows)
