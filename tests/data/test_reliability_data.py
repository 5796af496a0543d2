"""Fuzzing the data path with malformed annotation files and images.

Seeded and bounded: every trial starts from a small valid data set (both record formats)
and applies a few mutation operators picked by a NumPy RNG: wrong types, NaN/inf/huge
coordinates, huge polygons, unicode and over-long paths, truncated JSON, truncated/garbage
JPEGs, grayscale/16-bit/RGBA/palette/float images, images of other sizes, empty lists,
nested garbage. The outcome must be a clear :class:`AnnotationError` naming the file (and the
record for record-level problems) or a correct load -- through ``load_annotations`` and through
``OCTDataModule`` + the tiny model's real processor -- never an exception from deep inside.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from PIL import Image

from sa2va.data.annotations import AnnotationError, load_annotations
from sa2va.data.datamodule import OCTDataModule
from sa2va.model.mllm import SEG_TOKEN
from sa2va.utils import CONF_DIR

TRIALS = 60
SIZE = 32  # source images are SIZE x SIZE


@pytest.fixture(scope="module")
def processor():
    """The tiny model's real processor (tokenizer, InternVL tiles, SAM2 view)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train")
    GlobalHydra.instance().clear()
    return instantiate(cfg.model).processor


def _square(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _base_records() -> list[dict[str, Any]]:
    """Two videos of three frames, official and seed-002 records mixed."""
    records = []
    for v in range(2):
        for f in range(1, 4):
            image = f"p{v}_frame_{f:06d}.jpg"
            if (v + f) % 2:
                records.append(
                    {"image": image, "text": ["vessel"], "mask": [[_square(4, 4, 20, 12)]]}
                )
            else:
                seg = {"segmentation": [_square(8, 8, 24, 28)], "category_id": 1}
                records.append({"image": image, "mask": [seg], "conversations": []})
    return records


def _write_image(path: Path, rng: np.random.Generator, mode: str = "L", size: int = SIZE) -> None:
    """Random pixels in ``mode``; the file format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 255, (size, size), dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(pixels.astype(np.uint16) * 257)  # full 16-bit range
    else:
        image = Image.fromarray(pixels).convert(mode)
    image.save(path)


# ------------------------------------------------------------------ mutation operators
# Each takes (rng, records, root) and mutates the records (a JSON-able list) and/or files;
# returning a string replaces the whole annotations.json text.

GARBAGE: list[Any] = [
    None,
    0,
    -1,
    1.5,
    True,
    "",
    "x",
    [],
    {},
    [[]],
    [[[]]],
    [None],
    {"a": {"b": [1, {}]}},
    float("nan"),
    10**400,
    "\u0000",
    ["\ud7ff"],
    [1, "a", None],
]
NUMBERS: list[Any] = [
    float("nan"),
    float("inf"),
    -float("inf"),
    1e308,
    -1e308,
    10**400,
    -5.0,
    1e6,
    True,
    "3",
    None,
]


def _pick(rng: np.random.Generator, items: list[Any]) -> Any:
    return copy.deepcopy(items[int(rng.integers(len(items)))])


def _record(rng: np.random.Generator, records: list) -> int | None:
    return int(rng.integers(len(records))) if records else None


def garbage_record(rng, records, root):
    if (i := _record(rng, records)) is not None:
        records[i] = _pick(rng, GARBAGE)


def drop_key(rng, records, root):
    if (i := _record(rng, records)) is not None and isinstance(records[i], dict) and records[i]:
        records[i].pop(_pick(rng, sorted(records[i])))


def wrong_type_field(rng, records, root):
    i = _record(rng, records)
    if i is None or not isinstance(records[i], dict):
        return
    key = _pick(
        rng,
        ["image", "mask", "text", "video_id", "frame_index", "mask_file", "category_id", "frame"],
    )
    if key == "category_id" and isinstance(records[i].get("mask"), list) and records[i]["mask"]:
        entry = records[i]["mask"][0]
        if isinstance(entry, dict):
            entry[key] = _pick(rng, GARBAGE + ["1", 2, 1.0])
            return
    records[i][key] = _pick(rng, GARBAGE)


def _polygons(records: list) -> list[list]:
    """Every polygon list reachable in the records (both formats)."""
    found = []
    for rec in records:
        masks = rec.get("mask") if isinstance(rec, dict) else None
        for obj in masks if isinstance(masks, list) else []:
            polys = obj.get("segmentation") if isinstance(obj, dict) else obj
            if isinstance(polys, list):
                found += [p for p in polys if isinstance(p, list) and p]
    return found


def bad_coordinate(rng, records, root):
    if polys := _polygons(records):
        poly = polys[int(rng.integers(len(polys)))]
        poly[int(rng.integers(len(poly)))] = _pick(rng, NUMBERS)


def reshape_polygon(rng, records, root):
    if polys := _polygons(records):
        poly = polys[int(rng.integers(len(polys)))]
        kind = int(rng.integers(5))
        if kind == 0:  # huge: 20k points on a circle inside the image
            t = np.linspace(0, 2 * np.pi, 20_000, endpoint=False)
            xy = np.stack([16 + 10 * np.cos(t), 16 + 10 * np.sin(t)], 1)
            poly[:] = xy.ravel().tolist()
        elif kind == 1:
            del poly[-1]  # odd length
        elif kind == 2:
            del poly[4:]  # two points
        elif kind == 3:
            poly[:] = [[poly[k], poly[k + 1]] for k in range(0, len(poly) - 1, 2)]  # [[x, y], ...]
        else:
            poly[:] = [list(poly)]  # one level too deep


def empty_lists(rng, records, root):
    kind = int(rng.integers(3))
    if kind == 0:
        records.clear()
    elif (i := _record(rng, records)) is not None and isinstance(records[i], dict):
        records[i]["mask" if kind == 1 else "text"] = []


def duplicate_record(rng, records, root):
    if (i := _record(rng, records)) is not None:
        records.append(copy.deepcopy(records[i]))


def strange_path(rng, records, root):
    i = _record(rng, records)
    if (
        i is None
        or not isinstance(records[i], dict)
        or not isinstance(records[i].get("image"), str)
    ):
        return
    name = _pick(
        rng,
        [
            "血管_frame_000001.jpg",
            "caf\u00e9 \U0001f600_frame_000002.jpg",
            "x" * 300 + ".jpg",
            "../outside.jpg",
            "nul\u0000byte.jpg",
            "sub/dir/deep_frame_000009.jpg",
            "",
        ],
    )
    old = root / "images" / records[i]["image"]
    if int(rng.integers(2)) and old.is_file() and name and "\u0000" not in name and len(name) < 255:
        new = root / "images" / name
        new.parent.mkdir(parents=True, exist_ok=True)
        old.replace(new)  # the file really has the strange name
    records[i]["image"] = name


def broken_json(rng, records, root):
    text = json.dumps(records)
    kind = int(rng.integers(5))
    if kind == 0:
        return text[: int(rng.integers(len(text)))]
    if kind == 1:
        return "\ufeff" + text  # BOM
    if kind == 2:
        return _pick(rng, ['{"image": "a.jpg"}', '"records"', "42", "null", "", "[,]"])
    if kind == 3:
        return text.replace("[", "[" * 30, 1)  # nested garbage
    return text.replace('"', "'")


def damage_image(rng, records, root):
    images = sorted((root / "images").glob("*"))
    if not images:
        return
    path = images[int(rng.integers(len(images)))]
    if not path.is_file():
        return
    data = path.read_bytes()
    kind = int(rng.integers(4))
    if kind == 0:
        path.write_bytes(data[: max(1, int(rng.integers(len(data))))])  # truncated
    elif kind == 1:
        path.write_bytes(b"")
    elif kind == 2:
        path.write_bytes(rng.integers(0, 255, 500, dtype=np.uint8).tobytes())
    else:
        path.unlink()


def odd_image(rng, records, root):
    """Other modes, bit depths and sizes (polygons stay where they were)."""
    i = _record(rng, records)
    if (
        i is None
        or not isinstance(records[i], dict)
        or not isinstance(records[i].get("image"), str)
    ):
        return
    mode = _pick(rng, ["L", "RGB", "RGBA", "P", "I;16", "1", "CMYK", "LA", "F"])
    size = _pick(rng, [SIZE, 1, 8, 17, 64, 300])
    name = records[i]["image"]
    if not name:
        return
    path = root / "images" / Path(name).name
    for old in (root / "images").glob(f"{Path(name).stem}.*"):
        old.unlink()
    suffix = ".jpg" if mode in ("L", "RGB", "CMYK") else ".tif" if mode == "F" else ".png"
    target = path.with_suffix(suffix)
    _write_image(target, rng, mode, size)
    records[i]["image"] = target.name


def odd_name(rng, records, root):
    """Object names with special tokens, template braces, unicode, blanks."""
    i = _record(rng, records)
    if i is None or not isinstance(records[i], dict):
        return
    name = _pick(rng, ["[SEG]", "vessel <image>", "<|im_end|>", "{name}", "血管", " ", "a\nb"])
    masks = records[i].get("mask")
    records[i]["text"] = [name] * (len(masks) if isinstance(masks, list) and masks else 1)
    if isinstance(records[i].get("image"), str) and int(rng.integers(2)):
        records[i].pop("mask", None)  # the object comes from a mask PNG, named by the text
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[4:12, 4:20] = 255
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / f"{Path(records[i]['image']).stem}.png")


OPERATORS: list[Callable] = [
    garbage_record,
    drop_key,
    wrong_type_field,
    bad_coordinate,
    reshape_polygon,
    empty_lists,
    duplicate_record,
    strange_path,
    broken_json,
    damage_image,
    odd_image,
    odd_name,
]


def _make_trial(seed: int, root: Path) -> tuple[Path, list[str]]:
    """Write a mutated data set under ``root``; returns annotations.json and the operators."""
    rng = np.random.default_rng(seed)
    records = _base_records()
    for rec in records:
        _write_image(root / "images" / rec["image"], rng)
    applied, text = [], None
    for _ in range(int(rng.integers(1, 4))):
        op = OPERATORS[int(rng.integers(len(OPERATORS)))]
        applied.append(op.__name__)
        text = op(rng, records, root) or text
    path = root / "annotations.json"
    path.write_text(text if text is not None else json.dumps(records), encoding="utf-8")
    return path, applied


# ------------------------------------------------------------------ checks


def _check_error(error: AnnotationError, path: Path) -> None:
    message = str(error)
    assert str(path) in message, message
    lines = message.splitlines()
    if lines[0].startswith(tuple("0123456789")):  # "<n> bad record(s) in <file>": per record
        assert all(re.match(rf"{re.escape(str(path))}: record \d+ ", line) for line in lines[1:])


def _check_sample(input_ids: torch.Tensor, masks: torch.Tensor, seg_id: int) -> None:
    """Boolean (T, M, S, S) masks and one [SEG] per object in the tokens."""
    assert masks.dtype == torch.bool and masks.ndim == 4 and masks.shape[1] >= 1
    assert int((input_ids == seg_id).sum()) == masks.shape[1]


def _run_trial(path: Path, root: Path, processor) -> str:
    """The outcome of one mutated data set: "file rejected", "no usable record" or "loaded"."""
    try:
        load_annotations(path, root, on_bad_record="error")
    except AnnotationError as error:
        _check_error(error, path)
    try:
        records, bad = load_annotations(path, root, on_bad_record="skip")
    except AnnotationError as error:  # the file itself is unusable
        _check_error(error, path)
        return "file rejected"
    assert {b.index for b in bad}.isdisjoint(r.record_index for r in records)
    if not records:
        return "no usable record"
    dm = OCTDataModule(root=str(root), on_bad_record="skip", split_ratios=(1, 1, 1), batch_size=2)
    dm.processor = processor
    seg_id = processor.tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    seen = 0
    for batch in dm.train_dataloader():  # the training path: sampler, processor, collate
        for input_ids, masks in zip(batch["input_ids"], batch["masks"], strict=True):
            _check_sample(input_ids, masks, seg_id)
            seen += 1
    assert seen == len(dm.dataset("train"))
    for split in ("val", "test"):
        dataset = dm.dataset(split)
        for i in range(len(dataset)):
            sample = dataset[i]
            _check_sample(sample["input_ids"], sample["masks"], seg_id)
    return "loaded with skipped records" if bad else "loaded"


def test_fuzzed_annotations_fail_clearly_or_load_correctly(tmp_path, processor):
    outcomes: Counter[str] = Counter()
    used: set[str] = set()
    for seed in range(TRIALS):
        root = tmp_path / f"trial{seed}"
        path, applied = _make_trial(seed, root)
        used.update(applied)
        try:
            outcomes[_run_trial(path, root, processor)] += 1
        except Exception as error:
            raise AssertionError(f"trial {seed} ({', '.join(applied)}): {error!r}") from error
    assert used == {op.__name__ for op in OPERATORS}
    # the fuzzing reached every outcome but the rare "no usable record"
    assert {"file rejected", "loaded", "loaded with skipped records"} <= set(outcomes), outcomes


# ------------------------------------------------------------------ what the fuzzing found


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"mask": [[[4, 4, 10**400, 4, 20, 12, 4, 12]]]}, "out-of-range coordinate"),
        ({"image": "x" * 300 + ".jpg"}, "image not found"),
        ({"text": ["[SEG]"]}, "reserved for the model's tokens"),
        ({"text": ["vessel<|im_end|>"]}, "reserved for the model's tokens"),
        ({"text": ["  "]}, "'text' must be a list of non-empty strings"),
    ],
    ids=["int-beyond-float", "name-too-long", "seg-token-name", "chat-token-name", "blank-name"],
)
def test_found_by_fuzzing_is_a_bad_record(tmp_path, change, problem):
    """Were: OverflowError, OSError(ENAMETOOLONG), a sample with two [SEG] per object (so
    masks and [SEG] embeddings no longer pair up), a broken chat template, a blank prompt."""
    records = _base_records()
    rng = np.random.default_rng(0)
    for rec in records:
        _write_image(tmp_path / "images" / rec["image"], rng)
    records[0] = {**records[0], **change}  # an official-format record
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(records))
    with pytest.raises(AnnotationError) as info:
        load_annotations(path, tmp_path)
    assert re.search(
        rf"{re.escape(str(path))}: record 0 \(.*\): .*{re.escape(problem)}", str(info.value)
    )
