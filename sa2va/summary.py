"""What a run prints at its end: a short table of headline metrics, where its files are, and
the next commands with the real paths filled in. Built from the run's own record (the
summary dict that ``metrics.json`` holds, an export manifest), so it says what was written.

Used by every app (train, eval, predict, export) and, for sweeps, by a Hydra callback at the
end of the multirun (:class:`SweepSummary`, registered in ``conf/hydra/default.yaml``).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from sa2va.evaluation.report import format_stat

# Training metrics worth a line, in this order (the rest stay in metrics.json).
TRAIN_HEADLINE = ("val/dice", "val/iou", "test/dice", "test/iou", "val/loss", "train/loss")
EVAL_HEADLINE = ("dice", "iou", "cldice", "hd95")
PREDICT_INPUT = "input=IMAGE_FOLDER_VIDEO_OR_DICOM"  # the one path a run cannot know


def command(*parts: str) -> str:
    """A shell line; every argument quoted where the shell would split or expand it."""
    return " ".join(shlex.quote(p) for p in parts)


def render(
    title: str,
    metrics: Sequence[tuple[str, str]],
    paths: Sequence[tuple[str, str]],
    commands: Sequence[str],
) -> str:
    """The block every run ends with (plain text, Markdown-compatible table)."""
    lines = [f"== {title} =="]
    if metrics:
        width = max(len(name) for name, _ in metrics)
        lines += ["", f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {name:<{width}} | {value} |" for name, value in metrics]
    lines += [""] + [f"{label}: {path}" for label, path in paths]
    if commands:
        lines += ["", "next:"] + [f"  {c}" for c in commands]
    return "\n".join(lines)


def data_overrides(overrides: Sequence[str]) -> list[str]:
    """The command-line data settings of a run (``data=oct``, ``data.root=...``): eval needs
    the same ones to rebuild the training splits."""
    keys = [(o, o.split("=", 1)[0].lstrip("+~")) for o in overrides]
    return [o for o, key in keys if key == "data" or key.startswith("data.")]


def train_summary(record: Mapping[str, Any]) -> str:
    """After ``python -m sa2va.train``: validation metrics, best checkpoint, eval/export/compare."""
    run_dir = Path(record["output_dir"])
    values = record.get("metrics", {})
    metrics = [(k, f"{values[k]:.4f}") for k in TRAIN_HEADLINE if k in values]
    metrics.append(("steps", str(record.get("global_step", "?"))))
    best = record.get("best_checkpoint") or str(run_dir / "checkpoints" / "last.ckpt")
    data = data_overrides(record.get("overrides", []))
    report = run_dir.parent / "report"
    commands = [
        command("python", "-m", "sa2va.eval", f"ckpt_path={best}", *data),
        command("python", "-m", "sa2va.export", f"ckpt_path={best}", f"out={run_dir / 'export'}"),
        command("python", "-m", "sa2va.compare", str(run_dir.parent), "--out", str(report)),
    ]
    paths = [("run dir", str(run_dir)), ("best checkpoint", best)]
    if record.get("best_score") is not None:
        paths.append(("best val/dice", f"{record['best_score']:.4f}"))
    return render(f"train {record['status']}", metrics, paths, commands)


def eval_summary(record: Mapping[str, Any]) -> str:
    """After ``python -m sa2va.eval``: per-image means with CIs at each threshold."""
    out = Path(record["output_dir"])
    ci = round(100 * record.get("ci", 0.95))
    metrics = []
    for name, result in record["results"].items():
        per_image = result["per_image"]
        for key in EVAL_HEADLINE:
            if key in per_image:
                label = f"{key} @ {result['threshold']:g} ({name}, {ci}% CI)"
                metrics.append((label, format_stat(per_image[key], record["n_videos"])))
    ckpt = record["checkpoint"]
    commands = []
    if "tuned" not in record["results"]:
        tune = [*data_overrides(record.get("overrides", [])), "eval.tune_threshold=true"]
        commands.append(command("python", "-m", "sa2va.eval", f"ckpt_path={ckpt}", *tune))
    commands += [
        command("python", "-m", "sa2va.predict", f"ckpt_path={ckpt}", PREDICT_INPUT),
        command("python", "-m", "sa2va.export", f"ckpt_path={ckpt}", f"out={out / 'export'}"),
    ]
    paths = [
        ("split", f"{record['split']} ({record['n_images']} images, {record['n_videos']} videos)"),
        ("checkpoint", ckpt),
        ("results", str(out / "results.md")),
        ("metrics", str(out / "metrics.json")),
    ]
    return render("eval completed", metrics, paths, commands)


def predict_summary(record: Mapping[str, Any]) -> str:
    """After ``python -m sa2va.predict``: what was segmented, where the masks are."""
    out = Path(record["output_dir"])
    metrics = [
        ("sequences", str(len(record["sequences"]))),
        ("frames", str(record["n_frames"])),
        ("threshold", f"{record['threshold']:g} ({record['threshold_source']})"),
    ]
    paths = [("output", str(out)), ("masks", str(out / "masks"))]
    paths += [(f"export {Path(p).name}", str(out / p)) for p in record.get("exports", [])]
    commands = []
    if "coco.json" in record.get("exports", []):
        commands.append(
            "# corrected in the annotation tool, into a data set (frames in DATASET/images):"
        )
        coco = f"path={out / 'coco.json'}"
        commands.append(
            command("python", "-m", "sa2va.data.interchange", "format=coco", coco, "root=DATASET")
        )
    return render("predict completed", metrics, paths, commands)


def export_summary(manifest: Mapping[str, Any], out: str | Path) -> str:
    """After ``python -m sa2va.export``: the folder, its card, how to use and upload it."""
    out = Path(out)
    metrics = [
        ("parameters", f"{manifest['num_parameters']:,}"),
        ("LoRA", str(manifest["lora"])),
        ("format", str(manifest["format"])),
    ]
    paths = [
        ("export", str(out)),
        ("manifest", str(out / "manifest.json")),
        ("model card", str(out / "README.md")),
    ]
    commands = [
        command("python", "-m", "sa2va.predict", f"ckpt_path={out}", PREDICT_INPUT),
        command("hf", "upload", f"<user>/{out.name}", str(out), ".", "--repo-type", "model"),
    ]
    return render("export completed", metrics, paths, commands)


def sweep_summary(sweep_dir: str | Path) -> str:
    """After ``python -m sa2va.train -m ...``: each job's status and val/dice, then compare."""
    sweep_dir = Path(sweep_dir)
    metrics = []
    for path in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: p.parent.name):
        record = json.loads(path.read_text())
        dice = record.get("metrics", {}).get("val/dice")
        value = f"{dice:.4f}" if dice is not None else record.get("status", "?")
        metrics.append((f"{path.parent.name} val/dice", value))
    commands = [command("python", "-m", "sa2va.compare", str(sweep_dir))]
    return render(
        f"sweep of {len(metrics)} jobs", metrics, [("sweep dir", str(sweep_dir))], commands
    )


class SweepSummary(Callback):
    """Hydra callback: the sweep summary once every job of a multirun has finished."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        print(sweep_summary(config.hydra.sweep.dir))
