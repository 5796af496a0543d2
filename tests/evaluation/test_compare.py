"""sa2va.compare on hand-made run dirs: grouping, statistics, failures, outputs and CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from sa2va.compare import main
from sa2va.evaluation.comparison import compare_jobs
from sa2va.evaluation.runs import BEST, load_jobs
from sa2va.overrides import override_label, parse_overrides, swept_keys

WEIGHTS = {"bce_dice": (1.0, 1.0, 0.0), "bce_dice_lang": (1.0, 1.0, 0.5)}


def make_job(
    sweep: Path,
    num: int,
    overrides: list[str],
    status: str | None = "completed",
    dice: float = 0.5,
    choices: dict | None = None,
    task: str = "train",
) -> Path:
    """A run dir as `sa2va.train` leaves it (metrics.json, .hydra/*, csv/metrics.csv)."""
    run = sweep / f"{num}_{','.join(overrides)}"
    items = parse_overrides(overrides)
    loss = items.get("loss", "bce_dice_lang")
    choices = {"model": "sa2va_tiny", "loss": loss, "experiment": None} | (choices or {})
    hydra = {"hydra": {"runtime": {"choices": choices}, "job": {"num": num}}}
    config = {"task_name": task, "seed": int(items.get("seed", 0)), "trainer": {"max_steps": 4}}
    for name, content in [("hydra", hydra), ("config", config), ("overrides", overrides)]:
        (run / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(content), run / ".hydra" / f"{name}.yaml")
    if status is not None:
        w_mask, w_dice, w_lang = WEIGHTS[loss]
        summary = {
            "status": status,
            "seed": config["seed"],
            "ablation": {"loss.w_mask": w_mask, "loss.w_dice": w_dice, "loss.w_lang": w_lang},
        }
        if status == "completed":
            names = ("val/dice", "val/iou", "val/precision", "val/recall")
            summary["metrics"] = {m: dice for m in names} | {"train/loss": 1.0}
            summary["best_score"] = dice + 0.1
        else:
            summary["error"] = "ValueError: bad things"
        (run / "metrics.json").write_text(json.dumps(summary))
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text(
        f"epoch,step,train/loss,val/dice\n0,0,2.0,\n0,1,,{dice - 0.1}\n0,3,1.0,{dice}\n"
    )
    return run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """loss x seed, 2 x 3: one failed job, one without metrics.json, plus an eval run."""
    root = tmp_path / "sweep"
    dice = {("bce_dice", 0): 0.50, ("bce_dice", 1): 0.60, ("bce_dice", 2): 0.70}
    dice |= {("bce_dice_lang", 0): 0.65, ("bce_dice_lang", 1): 0.75}
    num = 0
    for loss in WEIGHTS:
        for seed in range(3):
            overrides = [f"loss={loss}", f"seed={seed}", "trainer.max_steps=4"]
            if (loss, seed) in dice:
                make_job(root, num, overrides, dice=dice[(loss, seed)])
            else:
                make_job(root, num, overrides, status="failed")
            num += 1
    make_job(root, num, ["loss=bce_dice", "seed=3", "trainer.max_steps=4"], status=None)
    make_job(tmp_path / "sweep" / "eval_run", 0, ["loss=bce_dice"], task="eval")
    return root


def test_groups_by_the_varying_overrides_with_mean_and_std_over_seeds(sweep: Path):
    comparison = compare_jobs(load_jobs(sweep), str(sweep))
    assert comparison.axes == ["loss"]
    assert comparison.fixed == {"trainer.max_steps": "4"}
    assert comparison.details == ["loss.w_lang"]  # w_mask/w_dice equal in both arms
    by_loss = {g.values: g for g in comparison.groups}
    assert set(by_loss) == {("bce_dice",), ("bce_dice_lang",)}
    plain, lang = by_loss[("bce_dice",)], by_loss[("bce_dice_lang",)]
    mean, std, n = plain.stats("val/dice")
    assert (mean, n) == (pytest.approx(0.6), 3) and std == pytest.approx(
        np.std([0.5, 0.6, 0.7], ddof=1)
    )
    assert lang.stats(BEST)[:2] == (pytest.approx(0.8), pytest.approx(np.std([0.75, 0.85], ddof=1)))
    counts = {
        g.values[0]: [g.count(s) for s in ("completed", "failed", "missing")]
        for g in by_loss.values()
    }
    assert counts == {"bce_dice": [3, 0, 1], "bce_dice_lang": [2, 1, 0]}


def test_markdown_and_csv_have_every_cell_and_list_failures(sweep: Path, tmp_path: Path):
    comparison = compare_jobs(load_jobs(sweep), str(sweep))
    text = comparison.markdown()
    assert "| bce_dice | 0.0 | 3 | 0 | 1 | 0.6000 ± 0.1000 |" in text
    assert "| bce_dice_lang | 0.5 | 2 | 1 | 0 | 0.7000 ± 0.0707 |" in text
    assert "## Failed jobs" in text and "ValueError: bad things" in text
    assert "seed=3" in text.split("## Jobs without metrics.json")[1]
    rows = comparison.rows()
    assert [r["loss"] for r in rows] == ["bce_dice", "bce_dice_lang"]
    for row in rows:
        for metric in ("val/dice", "val/iou", "val/precision", "val/recall", BEST):
            assert math.isfinite(row[f"{metric} mean"]) and math.isfinite(row[f"{metric} std"])


def test_a_key_left_at_its_default_is_filled_from_the_config_choices(tmp_path: Path):
    make_job(tmp_path, 0, ["seed=0"], dice=0.7)  # default model (sa2va_tiny)
    make_job(tmp_path, 1, ["seed=1"], dice=0.8)
    make_job(tmp_path, 2, ["model=unet", "seed=0"], dice=0.4, choices={"model": "unet"})
    comparison = compare_jobs(load_jobs(tmp_path))
    assert comparison.axes == ["model"]
    assert {g.values: g.stats("val/dice")[0] for g in comparison.groups} == {
        ("sa2va_tiny",): pytest.approx(0.75),
        ("unet",): pytest.approx(0.4),
    }


def test_one_job_is_one_group_with_its_value_only(tmp_path: Path):
    make_job(tmp_path, 0, ["seed=0"], dice=0.7)
    comparison = compare_jobs(load_jobs(tmp_path))
    assert comparison.axes == [] and comparison.label(comparison.groups[0]) == "all"
    assert "| 1 | 0 | 0 | 0.7000 |" in comparison.markdown()


def test_cli_writes_the_report_files(sweep: Path, tmp_path: Path, capsys):
    other = tmp_path / "unet_sweep"
    make_job(other, 0, ["model=unet", "seed=0"], dice=0.3, choices={"model": "unet"})
    out = tmp_path / "report"
    assert main([str(sweep), str(other), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"comparison.md", "comparison.csv", "runs.csv"} <= names
    assert {"comparison_bars.png", "training_curves.png"} <= names
    with (out / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 8 and [r["status"] for r in runs].count("failed") == 1
    assert "| loss | model |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(sweep), str(other)])  # two roots need --out


def test_clear_errors_for_bad_input(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_jobs(tmp_path / "absent")
    with pytest.raises(ValueError, match="no training jobs found"):
        compare_jobs(load_jobs(tmp_path), str(tmp_path))
    run = make_job(tmp_path, 0, ["seed=0"])
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"metrics.json: not valid JSON"):
        load_jobs(tmp_path)


def test_override_helpers_use_hydra_grammar():
    lines = ["+experiment/freeze_arm=sam2_full", "model/sam2@model.sam2=hiera_t", "seed=1"]
    assert parse_overrides(lines) == {
        "experiment/freeze_arm": "sam2_full",
        "model/sam2@model.sam2": "hiera_t",
        "seed": "1",
    }
    assert swept_keys(["loss=a,b", "seed=range(3)", "trainer.max_steps=4"]) == {"loss", "seed"}
    assert override_label(lines, exclude=["seed"], only=["seed", "experiment/freeze_arm"]) == (
        "experiment/freeze_arm=sam2_full"
    )


# ------------------------------------------------------------------ evaluation runs

VIDEOS, FRAMES = 5, 3


def make_eval(root: Path, train_run: Path, dice: np.ndarray, frames: int = FRAMES) -> Path:
    """An eval run dir as `sa2va.eval` leaves it for a checkpoint of ``train_run``."""
    ckpt = train_run / "checkpoints" / "last.ckpt"
    run = make_job(root / train_run.name, 0, ["seed=7"], status=None, task="eval")
    # a sweep's run dir holds "=" and ",": quoted on the command line, as Hydra needs
    overrides = [f"ckpt_path='{ckpt}'", "seed=7"]
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    keys = ("iou", "dice", "precision", "recall", "cldice", "hd95")
    rows = [
        {"video_id": f"v{i // frames}", "frame_index": i % frames, "image": "x.png"}
        | {"object": "blood vessel"}
        | {k: float(d) if k != "hd95" else 10 * float(d) for k in keys}
        for i, d in enumerate(dice)
    ]
    with (run / "per_image.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    per_image = {k: {"mean": float(np.mean([r[k] for r in rows]))} for k in keys}
    summary = {"status": "completed", "checkpoint": str(ckpt), "split": "test"}
    summary["results"] = {"default": {"threshold": 0.5, "per_image": per_image}}
    (run / "metrics.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def evaluated(tmp_path: Path) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """model x seed (sa2va_tiny x 2, unet x 2, attention_unet x 1), each evaluated on 5 x 3."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.9, VIDEOS * FRAMES)
    shift = {"sa2va_tiny": 0.0, "unet": -0.08, "attention_unet": -0.01}
    scores: dict[str, list[np.ndarray]] = {}
    num = 0
    for model, seeds in (("sa2va_tiny", 2), ("unet", 2), ("attention_unet", 1)):
        for seed in range(seeds):
            overrides = [f"model={model}", f"seed={seed}"]
            run = make_job(tmp_path / "sweep", num, overrides, choices={"model": model})
            dice = np.clip(base + shift[model] + rng.normal(0, 0.03, base.size), 0, 1)
            make_eval(tmp_path / "evals", run, dice)
            scores.setdefault(model, []).append(dice)
            num += 1
    return tmp_path, scores


def test_eval_runs_take_their_arm_from_the_training_run(evaluated):
    root, _ = evaluated
    jobs = load_jobs(root / "evals", "eval")
    assert len(jobs) == 5 and all(j.overrides["seed"] in ("0", "1") for j in jobs)
    comparison = compare_jobs(jobs)
    assert comparison.axes == ["model"]
    assert comparison.metrics[:2] == ("test/iou", "test/dice") and len(comparison.metrics) == 6
    assert {g.values[0]: len(g.jobs) for g in comparison.groups} == {
        "sa2va_tiny": 2,
        "unet": 2,
        "attention_unet": 1,
    }


def test_keys_that_vary_only_with_the_model_are_row_columns_not_arms(evaluated):
    """A row's own settings (here transunet's step count, as nnU-Net's schedule) and the
    evaluation's data source leave the arms and their labels to the model."""
    root, _ = evaluated
    overrides = ["model=transunet", "seed=0", "trainer.max_steps=9"]
    run = make_job(root / "sweep", 9, overrides, choices={"model": "transunet"})
    evaluation = make_eval(root / "evals", run, np.full(VIDEOS * FRAMES, 0.5))
    lines = [f"ckpt_path='{run}/checkpoints/last.ckpt'", "eval.data_from_checkpoint=true"]
    OmegaConf.save(OmegaConf.create(lines), evaluation / ".hydra" / "overrides.yaml")
    comparison = compare_jobs(load_jobs(root / "evals", "eval"))
    assert comparison.axes == ["model"] and comparison.details == ["trainer.max_steps"]
    rows = {row["model"]: row for row in comparison.rows()}
    # the others' value comes from their configs (make_job's 4 steps)
    assert (rows["transunet"]["trainer.max_steps"], rows["unet"]["trainer.max_steps"]) == ("9", "4")
    assert "vs model=sa2va_tiny: Δ Dice" in comparison.markdown()


def test_paired_tests_against_the_sa2va_arm_match_scipy(evaluated):
    root, scores = evaluated
    comparison = compare_jobs(load_jobs(root / "evals", "eval"), n_boot=500)
    assert comparison.label(comparison.reference) == "model=sa2va_tiny"
    ref = np.mean(scores["sa2va_tiny"], axis=0)  # each image averaged over the seeds
    p_values = {}
    for model in ("unet", "attention_unet"):
        diff = np.mean(scores[model], axis=0) - ref
        test = comparison.tests[(model,)]
        assert test.pairs == VIDEOS * FRAMES and test.delta.units == VIDEOS
        assert test.delta.estimate == pytest.approx(diff.mean())
        assert test.p == pytest.approx(stats.wilcoxon(diff).pvalue)
        p_values[model] = test.p
    low, high = sorted(p_values.values())
    assert sorted(comparison.holm.values()) == pytest.approx([2 * low, max(2 * low, high)])
    unet = comparison.tests[("unet",)]
    assert unet.delta.high < 0  # 0.08 worse on every image, beyond the noise
    text = comparison.markdown()
    assert "vs model=sa2va_tiny: Δ Dice [95% CI], p |" in text
    cell = f"{unet.delta.estimate:+.4f} [{unet.delta.low:+.4f}, {unet.delta.high:+.4f}], p="
    assert cell in text and "| reference |" in text
    assert "## 95% t-intervals of the mean over seeds" in text


def test_no_ci_below_the_minimum_videos_and_a_chosen_reference(evaluated):
    root, _ = evaluated
    jobs = load_jobs(root / "evals", "eval")
    comparison = compare_jobs(jobs, reference="model=unet", min_units=VIDEOS + 1)
    assert comparison.label(comparison.reference) == "model=unet"
    assert f"(n={VIDEOS} videos, no CI), p=" in comparison.markdown()
    with pytest.raises(ValueError, match="reference 'model=nnunet' is none of the arms"):
        compare_jobs(jobs, reference="model=nnunet")


def test_arms_on_other_images_are_refused(evaluated):
    root, _ = evaluated
    run = make_job(root / "sweep", 9, ["model=transunet", "seed=0"], choices={"model": "transunet"})
    make_eval(root / "evals", run, np.full(VIDEOS * FRAMES, 0.5), frames=FRAMES + 1)
    with pytest.raises(ValueError, match="evaluated on other images than the reference"):
        compare_jobs(load_jobs(root / "evals", "eval"))


def test_cli_compares_eval_runs(evaluated, capsys):
    root, _ = evaluated
    out = root / "report"
    assert main([str(root / "evals"), "--task", "eval", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"comparison.csv", "paired_differences.png"}
    with (out / "comparison.csv").open() as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert rows["sa2va_tiny"]["delta dice"] == ""
    assert float(rows["unet"]["p holm"]) >= float(rows["unet"]["p wilcoxon"])
    assert float(rows["unet"]["delta dice ci_high"]) < 0
    assert "test/dice" in capsys.readouterr().out


def test_test_metrics_of_the_best_checkpoint_are_compared(tmp_path: Path):
    for seed, test_dice in [(0, 0.6), (1, 0.8)]:
        run = make_job(tmp_path, seed, [f"seed={seed}"], dice=0.7)
        summary = json.loads((run / "metrics.json").read_text())
        summary["metrics"] |= {"test/dice": test_dice, "test/recall": 0.9}
        (run / "metrics.json").write_text(json.dumps(summary))
    make_job(tmp_path, 2, ["seed=2"], dice=0.7)  # a run from before test metrics existed
    (group,) = compare_jobs(load_jobs(tmp_path)).groups
    assert group.stats("test/dice")[0] == pytest.approx(0.7) and group.stats("test/dice")[2] == 2
    assert group.stats("test/recall")[2] == 2 and group.stats("test/iou")[2] == 0
