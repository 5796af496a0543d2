"""The bench report: machine description, Markdown table, docs fragment, console table."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sa2va.utils import atomic_write_bytes

CLOCKS = {"wall": "wall clock", "cpu": "this process's CPU time (data waits: wall clock)"}
DOC_BEGIN = "<!-- sa2va.bench:begin -->"
DOC_END = "<!-- sa2va.bench:end -->"


def machine(device: torch.device) -> dict[str, Any]:
    """Where the numbers came from."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def markdown(report: Mapping[str, Any]) -> str:
    m = report["machine"]
    gpu = f", GPU {m['gpu']}" if "gpu" in m else " (no GPU)"
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['memory_gb']} GiB{gpu}; "
        f"{m['torch_threads']} torch thread(s); torch {m['torch']}, lightning {m['lightning']}, "
        f"Python {m['python']}; load average "
        f"{report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after.",
        "",
        f"Run {report['date']} at git {report['git_sha'] or 'unknown'}: medians over "
        f"{report['repeats']} interleaved rounds after {report['warmup']} warm-up round(s); "
        f"times: {CLOCKS[report['clock']]}; ratio = A / B.",
        "",
    ]
    if report["rows"]:
        lines += [
            "| section | A / B | A | B | unit | ratio | goal | met | identical |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["rows"]:
            flag = {True: "yes", False: "**no**", None: "-"}
            lines.append(
                f"| {r['section']} | {r['name']} | {_fmt(r['a'])} | {_fmt(r['b'])} | {r['unit']} "
                f"| **{r['ratio']:.3g}** | {r['goal'] or '-'} | {flag[r['met']]} "
                f"| {flag[r['identical']]} |"
            )
        lines += ["", "Notes:", ""]
        lines += [
            f"- {r['section']}, {r['name']}: {r['note']}" for r in report["rows"] if r["note"]
        ]
    if report["measures"]:
        lines += ["", "| section | measure | value | unit | note |", "|---|---|---|---|---|"]
        lines += [
            f"| {x['section']} | {x['name']} | {_fmt(x['value'])} | {x['unit']} | {x['note']} |"
            for x in report["measures"]
        ]
    return "\n".join(lines) + "\n"


def doc_markers(block: str | None = None) -> tuple[str, str]:
    """The markers of a results block: the full bench's (None) or a preset's ("gpu")."""
    if block is None:
        return DOC_BEGIN, DOC_END
    return f"<!-- sa2va.bench:{block}:begin -->", f"<!-- sa2va.bench:{block}:end -->"


def update_doc(path: Path, fragment: str, block: str | None = None) -> None:
    """Replace the text between the markers of ``block`` in ``path`` (appending the block,
    or creating the file, if needed)."""
    begin, end = doc_markers(block)
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + f"{begin}\n{fragment}{end}\n" + tail.removeprefix("\n")
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + f"{begin}\n{fragment}{end}\n"
    atomic_write_bytes(path, text.encode())


def print_table(report: Mapping[str, Any]) -> None:
    for r in report["rows"]:
        goal = f"  goal {r['goal']}: {'met' if r['met'] else 'NOT met'}" if r["goal"] else ""
        same = {True: "  identical", False: "  DIFFERENT", None: ""}[r["identical"]]
        print(f"[{r['section']}] {r['name']}: {r['ratio']:.3g}x{goal}{same}")
    for x in report["measures"]:
        print(f"[{x['section']}] {x['name']}: {_fmt(x['value'])} {x['unit']}")
