"""The model card (``README.md``) of an export folder, from what the run recorded.

Sources, all found from the exported checkpoint: its own metadata (architecture, freeze
policy, threshold, data settings), the training run's ``metrics.json`` (loss, optimiser,
validation metrics, git sha: ``<run dir>/metrics.json`` beside ``checkpoints/``), the threshold
tuned on val (``<ckpt>.threshold.json``) and the last ``sa2va.eval`` (``<ckpt>.eval.json``
points at its ``metrics.json``: per-image means with bootstrap CIs). The split counts and the
split's hash are recomputed from the training data settings when the data is still there.
The YAML front matter is written by ``huggingface_hub`` (``ModelCardData``), so the Hub reads
it; nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sa2va.evaluation.report import format_stat
from sa2va.utils import checkpoint_record

log = logging.getLogger(__name__)

CARD_METRICS = ("dice", "iou", "cldice", "precision", "recall", "hd95", "nsd")
TAGS = ["sa2va", "optical-coherence-tomography", "oct", "vessel-segmentation", "research-only"]
LIMITATIONS = """\
- **Research use only. This is not a medical device** and has not been validated for
  diagnosis, screening or treatment decisions; do not use its masks for patient care.
- It was trained and evaluated on the data above only: other scanners, protocols, image
  sizes, pathologies and populations can change its accuracy in ways these numbers do not show.
- Masks are thresholded probabilities; thin (1-2 px) vessels are the least reliable part, and
  the confidence intervals are over the evaluation images, not over other data sets."""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_record(ckpt: Path) -> dict[str, Any] | None:
    """The training run's ``metrics.json`` when the checkpoint sits in its ``checkpoints/``."""
    return _read_json(ckpt.resolve().parent.parent / "metrics.json")


def last_eval(ckpt: Path) -> dict[str, Any] | None:
    """The summary of the checkpoint's last completed ``sa2va.eval``, if it is still there."""
    pointer = _read_json(checkpoint_record(ckpt, "eval"))
    record = _read_json(Path(pointer["metrics"])) if pointer else None
    return record if record and record.get("status") == "completed" else None


def release_like(model_config: Mapping[str, Any]) -> str:
    """The official Sa2VA release whose shapes this model's config preset has."""
    from sa2va.model.releases import RELEASES

    name = model_config.get("name")
    matches = [r.name for r in RELEASES.values() if r.config == name and r.layout == "hf_release"]
    return matches[0] if matches else ""


def data_splits(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Videos and frames per split, and a sha256 of the split's video ids (the same ids give
    the same hash), recomputed from the training data settings; {} when the data is gone."""
    if not settings:
        return {}
    from sa2va.data.datamodule import OCTDataModule

    try:
        dm = OCTDataModule(**settings)
        splits = {s: dm.videos(s) for s in ("train", "val", "test")}
    except (OSError, ValueError) as error:
        log.warning("model card: cannot recount the training splits (%s)", error)
        return {}
    ids = {s: sorted(v) for s, v in splits.items()}
    return {
        "root": str(dm.data_root),
        "counts": {s: (len(v), sum(len(f) for f in v.values())) for s, v in splits.items()},
        "sha256": hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest(),
    }


def metrics_section(evaluation: Mapping[str, Any] | None, ckpt: Path) -> list[str]:
    if evaluation is None:
        return [
            "No `sa2va.eval` of this checkpoint was found, so there are no test metrics yet:",
            "",
            f"    python -m sa2va.eval ckpt_path={ckpt} <the training data settings>",
        ]
    ci = round(100 * evaluation["ci"])
    results = evaluation["results"]
    header = " | ".join(f"threshold {r['threshold']:g} ({name})" for name, r in results.items())
    lines = [
        f"From `sa2va.eval` on the **{evaluation['split']}** split ({evaluation['n_images']} "
        f"images, {evaluation['n_videos']} videos; `{evaluation['output_dir']}`): per-image "
        f"mean ± std [{ci}% CI, a bootstrap over videos].",
        "",
        f"| metric | {header} |",
        "|---|" + "---|" * len(results),
    ]
    for key in CARD_METRICS:
        videos = evaluation["n_videos"]
        cells = [
            format_stat(r["per_image"][key], videos)
            for r in results.values()
            if key in r["per_image"]
        ]
        if cells:
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def eval_results(evaluation: Mapping[str, Any] | None, dataset: str) -> list[EvalResult] | None:
    """The Hub's structured results (``model-index``): the default threshold's means."""
    if evaluation is None:
        return None
    per_image = evaluation["results"]["default"]["per_image"]
    return [
        EvalResult(
            task_type="image-segmentation",
            dataset_type="oct-vessels",
            dataset_name=dataset,
            dataset_split=evaluation["split"],
            metric_type=key,
            metric_value=round(per_image[key]["mean"], 4),
        )
        for key in ("dice", "iou")
        if per_image.get(key, {}).get("n")
    ]


def _weights(path: str | None) -> str:
    return f"`{path}`" if path else "randomly initialised (no pretrained file)"


def _architecture(meta: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[str]:
    model = meta.get("model") or {}
    mllm = (model.get("mllm") or {}).get("config") or {}
    vision, text = mllm.get("vision_config") or {}, mllm.get("text_config") or {}
    release = release_like(model)
    shaped = f"shaped like the official **{release}**" if release else "no official release's shape"
    trunk = ((model.get("sam2") or {}).get("image_encoder") or {}).get("trunk") or {}
    sam2 = (
        f"Hiera trunk, embed_dim {trunk.get('embed_dim', '?')}, stages {trunk.get('stages', '?')}"
    )
    return [
        f"- `{meta.get('model_class')}` (config preset `{model.get('name')}`): {shaped}.",
        f"- InternVL: vision {vision.get('num_hidden_layers', '?')} layers x "
        f"{vision.get('hidden_size', '?')}, LLM {text.get('model_type', '?')} "
        f"{text.get('num_hidden_layers', '?')} layers x {text.get('hidden_size', '?')}; "
        f"MLLM weights: {_weights((model.get('mllm') or {}).get('path'))}.",
        f"- SAM2 ({sam2}), its mask decoder prompted by the `[SEG]` token; SAM2 weights: "
        f"{_weights(model.get('sam2_ckpt'))}.",
        f"- {manifest['num_parameters']:,} parameters; LoRA {manifest['lora']}; export format "
        f"`{manifest['format']}`, from `{manifest['source_checkpoint']}` (sha256 "
        f"`{manifest['source_sha256'][:16]}...`).",
    ]


def _data(settings: Mapping[str, Any] | None, splits: Mapping[str, Any]) -> list[str]:
    if not settings:
        return ["The checkpoint records no data settings (an export of an export?)."]
    source = (
        settings.get("root") or f"synthetic OCT vessels {dict(settings.get('synthetic') or {})}"
    )
    lines = [
        f"- data: `{splits.get('root', source)}` (`{settings.get('annotations_file')}`)",
        f"- split by video: ratios {list(settings.get('split_ratios', []))}, seed "
        f"{settings.get('split_seed')}",
    ]
    if not splits:
        return lines + ["- split counts: the data was not found at export time"]
    lines += ["- split sha256 (video ids per split): `" + splits["sha256"] + "`", ""]
    lines += ["| split | videos | frames |", "|---|---|---|"]
    lines += [f"| {s} | {v} | {f} |" for s, (v, f) in splits["counts"].items()]
    return lines


def _training(meta: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    keys = run.get("ablation") or {}
    loss = {k.removeprefix("loss."): v for k, v in keys.items() if k.startswith("loss.")}
    optim = {k.removeprefix("optim."): v for k, v in keys.items() if k.startswith("optim.")}
    values = run.get("metrics") or {}
    val = ", ".join(f"{k} {values[k]:.4f}" for k in ("val/dice", "val/iou") if k in values)
    return [
        f"- loss: {json.dumps(loss) if loss else 'not recorded (no run metrics.json)'}",
        f"- freeze policy: `{json.dumps(meta.get('freeze'))}`",
        f"- optimiser: {json.dumps(optim) if optim else 'not recorded'}",
        f"- steps: {meta.get('global_step')}, seed {run.get('seed', '?')}, git "
        f"`{run.get('git_sha', '?')}`, run dir `{run.get('output_dir', '?')}`",
        f"- last validation: {val or 'not recorded'}",
    ]


def _threshold(meta: Mapping[str, Any], tuned: Mapping[str, Any] | None) -> str:
    if tuned:
        return (
            f"**{tuned['threshold']:g}**, tuned on the {tuned.get('split', 'val')} split for "
            f"the mean per-image {tuned.get('metric', '?')} (`sa2va.predict` uses it by default)."
        )
    return f"**{meta.get('threshold', 0.5):g}**, the training default (none tuned on val yet)."


def model_card(
    ckpt: str | Path, folder: str | Path, meta: Mapping[str, Any], manifest: Mapping[str, Any]
) -> ModelCard:
    """The card of the export ``folder`` made from ``ckpt`` (see the module doc)."""
    ckpt, folder = Path(ckpt), Path(folder)
    run, evaluation = run_record(ckpt) or {}, last_eval(ckpt)
    tuned = _read_json(checkpoint_record(ckpt, "threshold"))
    splits = data_splits(meta.get("datamodule"))
    # no base_model: the weights may come from InternVL or from a Sa2VA release alike
    data = ModelCardData(
        model_name=folder.name,
        license="other",
        pipeline_tag="image-segmentation",
        tags=TAGS,
        eval_results=eval_results(evaluation, Path(splits.get("root", "data")).name),
    )
    use = (
        f"    python -m sa2va.predict ckpt_path={folder} input=<image, folder, video or DICOM>"
        if manifest["format"].startswith("sa2va-export")
        else "Official Sa2VA HF layout: copy the official `projects/sa2va/hf/models/*.py` here."
    )
    body = [
        f"# {folder.name}",
        "",
        "Sa2VA (InternVL + SAM2 joined by a `[SEG]` token) fine-tuned to segment blood vessels "
        "in OCT images and B-scan sequences, with this project's code.",
        "",
        "## Architecture",
        "",
        *_architecture(meta, manifest),
        "",
        "## Training data",
        "",
        *_data(meta.get("datamodule"), splits),
        "",
        "## Training",
        "",
        *_training(meta, run),
        "",
        "## Evaluation",
        "",
        *metrics_section(evaluation, ckpt),
        "",
        "## Threshold",
        "",
        _threshold(meta, tuned),
        "",
        "## Intended use and limitations",
        "",
        "Intended use: research on OCT vessel segmentation (method development, ablations, "
        "pre-annotation that a person corrects).",
        "",
        LIMITATIONS,
        "",
        "## Use",
        "",
        use,
        "",
        "## Upload to the Hugging Face Hub",
        "",
        "Set `license` above first (it depends on the base weights and your data), then:",
        "",
        f"    hf upload <user>/{folder.name} {folder} . --repo-type model",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
