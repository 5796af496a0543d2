"""Benchmarks: ``python -m sa2va.bench [bench=quick|gpu] [bench.sections=[...]] [bench.doc=PATH]``.

Every comparison runs its variants in this one process, interleaved: warm-up rounds first,
then ``bench.repeats`` rounds that alternate the order (A B, B A, ...), and the row reports
medians over the rounds and their ratio. Where two variants must compute the same thing the
row also says whether they did. On a shared CPU only ratios mean something; absolute times
and throughput count on a GPU. The sections (``bench.sections``), one module each in
:mod:`sa2va.benchmarks`:

* ``train_loop``: Lightning's fit vs a bare loop (goal <= 1.05).
* ``data``: the data set vs raw JPEG decode; data wait vs model time (goal <= 0.1).
* ``inference``: ``fast`` vs ``generate``, batching and video modes on the tiny model.
* ``generation``: ``generate`` / ``fast`` on a real LLM shape with random weights (goal
  <= 1.3 at 24 layers of Qwen2.5-0.5B), and ``fast`` vs its former full-vocabulary pass.
* ``propagation``: ``propagate`` vs Meta's ``SAM2VideoPredictor`` per SAM2 size (goal <= 1.0).
* ``sam2_compile``: the SAM2 image encoder with and without ``torch.compile``.
* ``feature_cache``, ``memory``, ``throughput``: cache on vs off, peak memory, FLOPs and MFU.
* ``gpu``: the GPU check's training cases against ``sa2va.plan`` (``bench=gpu``).

Presets (``conf/bench/``): ``default`` (everything but the GPU check), ``quick`` (every goal,
minutes on 2 cores), ``gpu`` (one GPU; refuses to start without CUDA once its plan is built).
Outputs: the table on stdout, ``bench.json`` and ``bench.md`` in the run dir, and with
``bench.doc`` the Markdown fragment between that preset's markers of that file.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from sa2va.benchmarks.run import run_bench
from sa2va.training.config import register_schemas
from sa2va.utils import CONF_DIR

register_schemas()


@hydra.main(config_path=CONF_DIR, config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    run_bench(cfg)


if __name__ == "__main__":
    main()
