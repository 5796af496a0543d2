"""Memory planner: will a configuration fit, and with which micro-batch?

    python -m sa2va.plan model=sa2va_8b trainer=deepspeed_stage_3 trainer.devices=4 \\
        plan.gpu_memory_gb=24

Builds the configured model on the meta device (shapes only: no weights, no files; its LoRA
adapters, ``model.lora``, included) with the freeze policy applied, then adds up, per GPU and
per node's CPU:

* model states — weights of every parameter, gradients and AdamW states of the trainable
  ones, in the bytes the chosen engine keeps (see :func:`model_state_bytes`), sharded as
  ZeRO-0/1/2/3 shard them and moved to the CPU by optimizer/parameter offload;
* activations of one micro-batch, per module family, counted only where backward needs them
  (frozen modules with no trainable module upstream save nothing) — with and without
  gradient checkpointing (see :func:`activation_bytes` for the formulas);
* a fixed allowance for the CUDA context and allocator fragmentation (``plan.overhead_gb``).

DeepSpeed's own ``estimate_zero3_model_states_mem_needs_all_cold`` is printed beside it: it
assumes every parameter trainable, which a frozen backbone with LoRA is far from.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sa2va.planning.report import (
    format_plan,
    plan,
)
from sa2va.training.config import register_schemas
from sa2va.utils import CONF_DIR, atomic_write_json

register_schemas()


@hydra.main(config_path=CONF_DIR, config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    result = plan(cfg)
    print(format_plan(result))
    atomic_write_json(Path(cfg.paths.output_dir) / "plan.json", result)


if __name__ == "__main__":
    main()
