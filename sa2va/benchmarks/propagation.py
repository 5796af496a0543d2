"""Video propagation against its peer: this project's SAM2 memory propagation vs Meta's
``SAM2VideoPredictor`` (same SAM2 config and weights, same JPEG frames, same first frame)."""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf, open_dict

from sa2va.benchmarks.harness import Bench, Measure, Results, Row, interleave, max_diff, per_item
from sa2va.data.datamodule import load_rgb
from sa2va.evaluation.metrics import iou
from sa2va.model.processor import Sa2VAProcessor
from sa2va.model.sam2 import build_sam2, upsample
from sa2va.utils import CONF_DIR

PREDICTOR = "sam2.sam2_video_predictor.SAM2VideoPredictor"


def sam2_config(name: str, image_size: int | None) -> dict[str, Any]:
    """``conf/model/sam2/<name>.yaml`` as plain values, at ``image_size`` when given."""
    cfg = OmegaConf.load(Path(CONF_DIR) / "model" / "sam2" / f"{name}.yaml")
    if image_size:
        with open_dict(cfg):
            cfg.image_size = int(image_size)
    return OmegaConf.to_container(cfg, resolve=True)


def build_predictor(cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> Any:
    """Meta's video predictor from the same config (its defaults: no post-processing) with
    the same weights (strict: both are ``SAM2Base`` with the same modules)."""
    from hydra.utils import instantiate

    predictor = instantiate({**cfg, "_target_": PREDICTOR}, _convert_="all")
    predictor.load_state_dict(state, strict=True)
    return predictor.eval()


def bench_propagation(bench: Bench) -> Results:
    """Per SAM2 size: ``propagate`` at each image-encoder batch vs the predictor, per frame
    from the JPEG files to masks at the frames' size; the fastest batch makes the row."""
    opts = bench.opts.propagation
    _, datamodule = bench.build()
    records = next(iter(datamodule.videos("test").values()))[: int(opts.frames)]
    with tempfile.TemporaryDirectory() as folder:
        for index, record in enumerate(records):  # the predictor reads "<index>.jpg"
            (Path(folder) / f"{index:05d}.jpg").symlink_to(Path(record.image_path).resolve())
        results = Results()
        for size in opts.sizes:
            row, overlap = _size_row(bench, size, folder)
            results.rows.append(row)
            results.measures.append(overlap)
        return results


def _size_row(bench: Bench, size: Mapping[str, Any], folder: str) -> tuple[Row, Measure]:
    """The row of one SAM2 size and the memory-tracked masks' mean IoU against the peer's."""
    opts = bench.opts.propagation
    cfg = sam2_config(size["sam2"], size.get("image_size"))
    torch.manual_seed(bench.cfg.seed)
    sam2 = build_sam2(cfg).to(bench.device).eval()
    predictor = build_predictor(cfg, sam2.state_dict()).to(bench.device)
    paths = sorted(Path(folder).iterdir())
    view = Sa2VAProcessor(  # only its SAM2 view: no tokenizer needed
        tokenizer=None, image_processor=None, image_seq_length=0, sam2_image_size=sam2.image_size
    ).sam2_view
    prompt = torch.randn(1, sam2.sam_prompt_encoder.embed_dim, generator=torch.Generator())
    prompt = prompt.to(bench.device)
    n = len(paths)

    def ours(batch_size: int) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            frames = [load_rgb(p) for p in paths]
            images = [view(f) for f in frames]
            outputs = sam2.propagate(images, prompt, 1, batch_size)
            hw = frames[0].size[::-1]
            return [upsample(out.low_res_masks[:, 0], hw)[0] for out in outputs]

        return run

    first_mask: list[torch.Tensor] = []

    def peer() -> list[torch.Tensor]:
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars would bury the table
            return run_predictor()

    def run_predictor() -> list[torch.Tensor]:
        state = predictor.init_state(folder)
        predictor.add_new_mask(state, frame_idx=0, obj_id=1, mask=first_mask[0])
        return [masks[0, 0] for _, _, masks in predictor.propagate_in_video(state)]

    with torch.inference_mode():
        first_mask.append(ours(1)()[0] > 0)  # the predictor's first-frame condition
        variants = {f"batch {b}": per_item(bench.clock, ours(int(b)), n) for b in opts.batch_sizes}
        medians, outputs = interleave(
            {**variants, "predictor": per_item(bench.clock, peer, n)}, bench.repeats, bench.warmup
        )
    best = min(variants, key=medians.__getitem__)
    tracked = [
        iou(a > 0, b > 0) for a, b in zip(outputs[best][1:], outputs["predictor"][1:], strict=True)
    ]
    blanked = sum(not bool((mask > 0).any()) for mask in outputs["predictor"][1:])
    times = ", ".join(f"{name} {1e3 * medians[name]:.1f} ms" for name in [*variants, "predictor"])
    label = f"{size['sam2']} at {sam2.image_size} px"
    overlap = Measure(
        "propagation",
        f"{label}: memory-tracked frames' mean IoU vs the predictor",
        statistics.mean(tracked),
        "",
        f"frames 2+, masks at logit 0; random weights: agreement of the two trackers only; "
        f"the predictor's mask is empty on {blanked} of {n - 1} (SAM2 blanks a mask whose "
        "object score is <= 0; Sa2VA's propagation, as the official one, does not)",
    )
    row = Row(
        "propagation",
        f"propagate / SAM2VideoPredictor, {label}, s per frame",
        medians[best],
        medians["predictor"],
        "s/frame",
        goal=str(opts.goal),
        note=(
            f"{n} frames from the same JPEGs to masks at frame size, random weights shared; "
            f"first frame: [SEG]-prompted here, its mask given to the predictor (add_new_mask); "
            f"image-encoder batch chosen by measurement: {best} ({times}); memory-tracked "
            f"frames' mean IoU vs the predictor: {statistics.mean(tracked):.3f}"
        ),
    )
    return row, overlap


def bench_sam2_compile(bench: Bench) -> Results:
    """The SAM2 image encoder eager vs ``torch.compile``d, on one batch of random images
    (compilation happens in the warm-up call and is reported, not timed in the ratio)."""
    opts = bench.opts.sam2_compile
    torch.manual_seed(bench.cfg.seed)
    sam2 = build_sam2(sam2_config(opts.sam2, opts.get("image_size"))).to(bench.device).eval()
    size = sam2.image_size
    images = torch.randn(int(opts.batch_size), 3, size, size, device=bench.device)
    compiled = torch.compile(sam2.image_encoder)
    precision = torch.autocast(bench.device.type, dtype=torch.bfloat16)

    def encoder(fn: Callable[[torch.Tensor], Any]) -> Callable[[], tuple[float, torch.Tensor]]:
        def run() -> torch.Tensor:
            with torch.inference_mode(), precision:
                return fn(images)["vision_features"].float()

        return per_item(bench.clock, run, len(images))

    compile_seconds, _ = bench.clock.seconds(encoder(compiled))
    medians, outputs = interleave(
        {"compiled": encoder(compiled), "eager": encoder(sam2.image_encoder)},
        bench.repeats,
        bench.warmup,
    )
    diff = max_diff([outputs["compiled"]], [outputs["eager"]])
    row = Row(
        "sam2_compile",
        f"SAM2 image encoder torch.compile / eager, {opts.sam2} at {size} px, s per image",
        medians["compiled"],
        medians["eager"],
        "s/image",
        identical=diff <= float(opts.atol),
        note=f"batch {len(images)}, bf16 autocast; first call (compilation) "
        f"{compile_seconds:.1f} s; max |feature difference| {diff:.1e}",
    )
    return Results(rows=[row])
