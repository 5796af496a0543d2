"""The nnU-Net v2 row of the comparison table: this repo's splits and labels in nnU-Net's raw
format, nnU-Net's own planning, preprocessing, 2D training and prediction, and scoring by
:mod:`sa2va.evaluation.evaluate` (same per-image rows, summary and ``metrics.json``).

nnU-Net (``pip install -e '.[nnunet]'``; see the Makefile for the two packages installed
without their dependencies) reads its folders from environment variables when first
imported, so :func:`run_nnunet` sets them (under the run dir) before importing it: one set
of folders per process.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sa2va.data.annotations import FrameRecord
from sa2va.data.datamodule import OCTDataModule, load_rgb
from sa2va.evaluation.evaluate import Scores, VideoResult
from sa2va.evaluation.report import results_markdown, write_tables
from sa2va.overrides import hydra_overrides
from sa2va.utils import atomic_write_bytes, atomic_write_json, git_sha, run_record

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TRAINER = "nnUNetTrainer"  # the base trainer, epochs set on it: variants are found by a
# search that imports every trainer module, some of which need timm (and torchvision)


def case_id(record: FrameRecord) -> str:
    """nnU-Net case identifier of a frame: the video id made file-safe, and the frame."""
    return f"{re.sub(r'[^A-Za-z0-9-]+', '-', record.video_id)}_{record.frame_index:05d}"


def dataset_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    return f"Dataset{dataset_id:03d}_{name}"


def object_name(dm: OCTDataModule) -> str:
    """The one object class nnU-Net is trained on (labels 0 background, 1 object)."""
    names = list(dm.category_names.values())
    if len(names) != 1:
        raise ValueError(
            f"the nnU-Net row segments one object class; the data names {len(names)}: {names}"
        )
    return names[0]


def export_raw(dm: OCTDataModule, raw_dir: Path) -> dict[str, list[str]]:
    """Write the data module's splits in nnU-Net's raw format under ``raw_dir``.

    Train and val frames go to ``imagesTr``/``labelsTr`` (fold 0 of ``splits_final.json``
    separates them), test frames to ``imagesTs``. Images are the RGB frames every row sees
    (``<case>_0000.png``, channels R, G, B); labels are this repo's rasterised masks at the
    image size (0/1 PNG). Returns the case ids per split.
    """
    name = object_name(dm)
    cases: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        images = raw_dir / ("imagesTs" if split == "test" else "imagesTr")
        images.mkdir(parents=True, exist_ok=True)
        cases[split] = []
        for record in dm.records(split):
            case = case_id(record)
            if case in seen:
                raise ValueError(f"{record.image_path} and {seen[case]} map to one case {case}")
            seen[case] = str(record.image_path)
            image = load_rgb(record.image_path)
            image.save(images / f"{case}_0000.png")
            cases[split].append(case)
            if split != "test":
                labels = raw_dir / "labelsTr"
                labels.mkdir(exist_ok=True)
                mask = record.mask(name, (image.height, image.width)).astype(np.uint8)
                Image.fromarray(mask).save(labels / f"{case}.png")
    dataset = {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, name: 1},
        "numTraining": len(cases["train"]) + len(cases["val"]),
        "file_ending": ".png",
        "description": "exported by sa2va.evaluation.nnunet from this repo's data module",
    }
    atomic_write_json(raw_dir / "dataset.json", dataset)
    return cases


def write_splits(preprocessed_dir: Path, cases: Mapping[str, list[str]]) -> None:
    """``splits_final.json`` whose fold 0 is this repo's train / val split."""
    atomic_write_json(
        preprocessed_dir / "splits_final.json", [{"train": cases["train"], "val": cases["val"]}]
    )


def set_nnunet_env(root: Path, workers: int, processes: int) -> dict[str, Path]:
    """nnU-Net's folder and worker variables, under ``root``; before nnU-Net is imported."""
    folders = {k: root / k.removeprefix("nnUNet_") for k in ("nnUNet_raw", "nnUNet_preprocessed")}
    folders["nnUNet_results"] = root / "results"
    for key, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[key] = str(folder)
    # nnU-Net's own (mixed-case) names. Its planner sets torch's thread count to the
    # augmentation worker count, which must be positive there; plan_and_train sets the
    # count training uses (0: augmentation in the training process) after planning.
    os.environ["nnUNet_n_proc_DA"] = str(max(workers, 1))  # noqa: SIM112
    os.environ["nnUNet_def_n_proc"] = str(processes)  # noqa: SIM112
    return folders


def resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def plan_and_train(dataset_id: int, ncfg: DictConfig, device) -> Path:
    """nnU-Net's fingerprint, plans, 2D preprocessing and training; the model folder."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.run.run_training import get_trainer_from_args

    extract_fingerprints([dataset_id], num_processes=ncfg.processes, check_dataset_integrity=True)
    plans_name = plan_experiments([dataset_id])
    configurations, processes = [ncfg.configuration], [ncfg.processes]
    preprocess([dataset_id], plans_name, configurations=configurations, num_processes=processes)
    os.environ["nnUNet_n_proc_DA"] = str(ncfg.workers)  # noqa: SIM112
    trainer = get_trainer_from_args(
        str(dataset_id), ncfg.configuration, 0, TRAINER, plans_name, device=device
    )
    trainer.num_epochs = ncfg.epochs
    trainer.num_iterations_per_epoch = ncfg.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = ncfg.val_iterations_per_epoch
    trainer.run_training()
    return Path(trainer.output_folder_base)


def predict_test(
    model_dir: Path, dm: OCTDataModule, raw_dir: Path, split: str, device
) -> Iterator[VideoResult]:
    """nnU-Net's predictor (fold 0, final checkpoint) over every video of ``split``: the
    softmax probability of the object class per frame, at the image's own size."""
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=False
    )
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))
    reader = NaturalImage2DIO()
    name = object_name(dm)
    images = raw_dir / ("imagesTs" if split == "test" else "imagesTr")
    for video_id, records in dm.videos(split).items():
        probs, gts = [], []
        for record in records:
            image, properties = reader.read_images([str(images / f"{case_id(record)}_0000.png")])
            _, probabilities = predictor.predict_single_npy_array(
                image, properties, save_or_return_probabilities=True
            )
            prob = probabilities[1, 0].astype(np.float32)  # (classes, 1, H, W) -> object, (H, W)
            probs.append(prob[None])
            gts.append(record.mask(name, prob.shape)[None])
        yield VideoResult(video_id, records, [name], probs, gts, missing=0)


def run_nnunet(cfg: DictConfig) -> dict[str, Any]:
    """Export, plan, preprocess, train, predict ``cfg.eval.split`` and score it as
    ``sa2va.eval`` does; always leaves ``metrics.json`` behind."""
    ncfg, ecfg = cfg.nnunet, cfg.eval
    out_dir = Path(cfg.paths.output_dir)
    name = dataset_name(ncfg.dataset_id, ncfg.dataset_name)
    summary: dict[str, Any] = {
        "status": "running",
        "split": ecfg.split,
        "video_mode": "per_frame",
        "mode": f"nnunet {ncfg.configuration}",
        "ci": ecfg.ci,
        "overrides": hydra_overrides(),
        "git_sha": git_sha(),
        "output_dir": str(out_dir),
        "nnunet": {"dataset": name, "trainer": TRAINER} | OmegaConf.to_container(ncfg),
    }
    with run_record(out_dir / "metrics.json", summary):
        folders = set_nnunet_env(out_dir / "nnunet", ncfg.workers, ncfg.processes)
        dm = instantiate(cfg.data)
        raw_dir = folders["nnUNet_raw"] / name
        cases = export_raw(dm, raw_dir)
        write_splits(folders["nnUNet_preprocessed"] / name, cases)
        device = resolve_device(ncfg.device)
        model_dir = plan_and_train(ncfg.dataset_id, ncfg, device)
        summary["checkpoint"] = str(model_dir / "fold_0" / "checkpoint_final.pth")
        scores = Scores(float(ecfg.threshold))  # as sa2va.eval scores (TCI included)
        for video in predict_test(model_dir, dm, raw_dir, ecfg.split, device):
            scores.add(video, ecfg)
        result = scores.summary(ecfg.n_boot, cfg.seed)
        summary |= {"results": {"default": result}, "missing_masks": 0}
        summary |= {"n_images": result["n_images"], "n_videos": result["n_videos"]}
        write_tables(out_dir, scores.image_rows, scores.video_rows)
        summary["status"] = "completed"
        atomic_write_bytes(out_dir / "results.md", results_markdown(summary).encode())
    return summary
