"""The plan: model states and activations for every setup, the largest micro-batch that
fits, DeepSpeed's own estimate beside ours, and the tables the CLI prints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

from omegaconf import DictConfig

from sa2va.planning.activations import (
    Activations,
    Workload,
    activation_bytes,
    sam2_decoder_elements,
)
from sa2va.planning.states import (
    ROWS,
    ParamStats,
    build_meta_model,
    deepspeed_estimate,
    model_state_bytes,
    selected_setup,
)
from sa2va.training.freeze import format_parameter_table, parameter_table
from sa2va.utils import to_plain

GIB = 2**30


def _world(trainer: Mapping[str, Any]) -> tuple[int, int]:
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, list | tuple):
        devices = len(devices)
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"trainer.devices={devices!r}: the planner needs a number of GPUs")
    return devices, nodes


def plan(cfg: DictConfig) -> dict[str, Any]:
    """Everything the CLI prints, as plain data (also written to ``plan.json``)."""
    from sa2va.model.mllm import image_seq_length

    pcfg, trainer = cfg.plan, cfg.trainer
    model = build_meta_model(cfg.model, cfg.freeze)
    config = model.mllm.config
    stats = ParamStats.of(model)
    per_node, nodes = _world(trainer)
    world = per_node * nodes
    precision = str(trainer.get("precision", "32-true"))
    act = 2 if "16" in precision else 4
    micro = int(pcfg.micro_batch or cfg.data.batch_size)
    frames = int(pcfg.frames or cfg.data.get("clip_len", 1))
    max_tiles = int(cfg.model.mllm.get("max_tiles", 1))
    work = Workload(
        micro_batch=micro,
        frames=frames,
        llm_frames=min(frames, int(cfg.model.get("mllm_frames", 5))),
        # a single image is tiled (at most max_tiles + a thumbnail); a video frame is 1 tile
        tiles_per_frame=max_tiles + 1 if max_tiles > 1 and frames == 1 else 1,
        prompts=int(pcfg.prompts),
        text_tokens=int(pcfg.text_tokens),
    )
    strategy = trainer.get("strategy")
    buckets = 400_000_000
    if isinstance(strategy, Mapping):
        buckets = int(strategy.get("allgather_bucket_size", 2e8)) + int(
            strategy.get("reduce_bucket_size", 2e8)
        )
    model_cfg = to_plain(cfg.model)
    checkpointing = bool(cfg.model.get("gradient_checkpointing", False))
    overhead = float(pcfg.overhead_gb) * GIB

    decoder = sam2_decoder_elements(model.sam2)

    def activations(batch: int, ckpt: bool) -> Activations:
        batch_work = replace(work, micro_batch=batch)
        return activation_bytes(model, stats, model_cfg, batch_work, act, ckpt, decoder)

    selected = selected_setup(trainer)
    rows = ROWS if selected in ROWS else [*ROWS, selected]
    acts = {ckpt: activations(micro, ckpt) for ckpt in (False, True)}
    table = []
    for setup in rows:
        states = model_state_bytes(stats, setup, precision, world, per_node, buckets)
        fixed = states.params + states.grads + states.optimizer + states.working + overhead
        table.append(
            {
                "setup": setup.name,
                "selected": setup == selected,
                **asdict(states),
                "activations": acts[checkpointing].total,
                "gpu_total": fixed + acts[checkpointing].total,
                "gpu_total_other_ckpt": fixed + acts[not checkpointing].total,
            }
        )
    states = model_state_bytes(stats, selected, precision, world, per_node, buckets)
    fixed = states.params + states.grads + states.optimizer + states.working + overhead
    budget = float(pcfg.gpu_memory_gb) * GIB
    suggestion = suggest_batches(
        lambda batch, ckpt: fixed + activations(batch, ckpt).total,
        budget,
        int(pcfg.effective_batch),
        world,
        checkpointing,
    )
    return {
        "model": cfg.model.get("name"),
        "freeze": cfg.freeze.get("name"),
        "precision": precision,
        "gpus": {"per_node": per_node, "nodes": nodes, "world": world},
        "gpu_memory_gb": float(pcfg.gpu_memory_gb),
        "gradient_checkpointing": checkpointing,
        "overhead_gb": float(pcfg.overhead_gb),
        "parameters": parameter_table(model),
        "stats": asdict(stats),
        "workload": {**asdict(work), "llm_tokens": work.llm_tokens(image_seq_length(config))},
        "activations": {str(k): asdict(v) for k, v in acts.items()},
        "rows": table,
        "cpu_at_startup": per_node * stats.total_bytes,
        "fits": fixed + acts[checkpointing].total <= budget,
        "suggestion": suggestion,
        "deepspeed": deepspeed_estimate(stats, per_node, nodes),
    }


def suggest_batches(
    total_for: Any, budget: float, effective: int, world: int, checkpointing: bool
) -> dict[str, Any]:
    """The largest micro-batch (a power of two) that fits with accumulation making up
    ``effective`` samples per optimiser step; gradient checkpointing if nothing fits without."""
    for ckpt in dict.fromkeys((checkpointing, True)):
        options = [m for m in (32, 16, 8, 4, 2, 1) if effective % (m * world) == 0]
        for micro in options:
            if total_for(micro, ckpt) <= budget:
                return {
                    "micro_batch": micro,
                    "accumulate_grad_batches": effective // (micro * world),
                    "gradient_checkpointing": ckpt,
                    "gpu_total": total_for(micro, ckpt),
                }
    return {"micro_batch": None, "reason": f"nothing fits {budget / GIB:.0f} GiB per GPU"}


def format_plan(result: Mapping[str, Any]) -> str:
    """The tables the CLI prints."""

    def gib(value: float) -> str:
        return f"{value / GIB:8.2f}"

    gpus = result["gpus"]
    work = result["workload"]
    ckpt = "on" if result["gradient_checkpointing"] else "off"
    lines = [
        f"model={result['model']} freeze={result['freeze']} precision={result['precision']} "
        f"GPUs={gpus['per_node']}x{gpus['nodes']} node(s)",
        "",
        format_parameter_table(result["parameters"]),
        "",
        f"micro-batch {work['micro_batch']}: {work['frames']} frame(s) per sample "
        f"({work['llm_frames']} to the MLLM, {work['tiles_per_frame']} tile(s) each), "
        f"{work['prompts']} object(s), {work['llm_tokens']} LLM tokens per sample",
        "activations per GPU (GiB), gradient checkpointing off / on:",
    ]
    off, on = result["activations"]["False"], result["activations"]["True"]
    for family in off:
        lines.append(f"  {family:<14}{gib(off[family])} /{gib(on[family])}")
    lines += [
        "",
        f"per GPU (GiB), gradient checkpointing {ckpt}; CPU per node (GiB):",
        f"{'setup':<30}{'params':>8}{'grads':>8}{'optim':>8}{'working':>8}"
        f"{'activ':>8}{'total':>8}{'other':>8}{'CPU':>8}",
    ]
    for row in result["rows"]:
        mark = "*" if row["selected"] else " "
        lines.append(
            f"{mark}{row['setup']:<29}{gib(row['params'])}{gib(row['grads'])}"
            f"{gib(row['optimizer'])}{gib(row['working'])}{gib(row['activations'])}"
            f"{gib(row['gpu_total'])}{gib(row['gpu_total_other_ckpt'])}{gib(row['cpu'])}"
        )
    other = "off" if result["gradient_checkpointing"] else "on"
    lines.append(
        f"(* = trainer config; other = total with gradient checkpointing {other}; totals "
        f"include {result['overhead_gb']:g} GiB for the CUDA context and fragmentation)"
    )
    lines += ["", "DeepSpeed's estimate (counts every parameter as trainable):"]
    lines += ["  " + line for line in result["deepspeed"]["printed"].rstrip().splitlines()]
    rows = {row["setup"]: row for row in result["rows"]}
    lines.append("model states per GPU (params + grads + optimizer + working), DeepSpeed vs here:")
    for name, theirs in result["deepspeed"]["rows"].items():
        ours = rows[name]
        states = ours["params"] + ours["grads"] + ours["optimizer"] + ours["working"]
        lines.append(f"  {name:<30}{gib(theirs['gpu'])} vs{gib(states)} GiB")
    lines.append(
        f"CPU at start-up: every rank builds the whole model before sharding, "
        f"{gib(result['cpu_at_startup']).strip()} GiB per node"
    )
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines += ["", f"selected setup {verdict} in {result['gpu_memory_gb']:g} GiB per GPU."]
    suggestion = result["suggestion"]
    if suggestion["micro_batch"] is None:
        lines.append(f"suggestion: {suggestion['reason']}; try offload or more GPUs")
    else:
        lines.append(
            f"suggestion: data.batch_size={suggestion['micro_batch']} "
            f"trainer.accumulate_grad_batches={suggestion['accumulate_grad_batches']} "
            f"model.gradient_checkpointing={str(suggestion['gradient_checkpointing']).lower()}"
            f" ({gib(suggestion['gpu_total']).strip()} GiB per GPU)"
        )
    return "\n".join(lines)
