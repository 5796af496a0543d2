"""Benchmarks: ``python -m sa2va.bench [bench.sections=[data,memory]] [bench.doc=PATH]``.

Every comparison runs its variants in this one process, interleaved: warm-up rounds first,
then ``bench.repeats`` rounds that alternate the order (A B, B A, ...), and the row reports
medians over the rounds and their ratio. Where two variants must compute the same thing
(Lightning vs a bare loop, ``fast`` vs ``generate``, with vs without the feature cache) the
row also says whether they did. On a shared CPU only ratios mean something; absolute times
and throughput count on a GPU (``bench.device=cuda``).

Sections (``bench.sections``):

* ``train_loop``: ``lightning.Trainer.fit`` on a fixed in-memory batch vs a bare PyTorch loop
  running the same forward/loss/backward/clip/step on the same model (goal <= 1.05).
* ``data``: the data set (decode + rasterise + both views + tokenise) vs raw JPEG decode of
  the same files; data wait vs model time per training step (goal << 1).
* ``inference``: ``fast`` vs ``generate`` per frame at identical masks (goal >= 3) once the
  tiny LM has learned the answer; batch 1 vs 4; video ``propagate`` vs ``per_frame``; and
  ``propagate`` vs the SAM2 image encoder + mask decoder alone (goal <= 1.3).
* ``feature_cache``: epochs with frozen encoders, cache on vs off (identical losses).
* ``memory``: peak RSS of each variant, one fresh subprocess per variant.
* ``throughput``: samples/s, tokens/s, FLOPs per step (``torch.utils.flop_counter``) and MFU
  (given ``bench.throughput.peak_tflops``), e.g. for ``model=sa2va_8b`` on a GPU: without its
  local files that is the 8B shape with random weights (see :meth:`Bench.build`).

Outputs: the table on stdout, ``bench.json`` and ``bench.md`` in the run dir, and with
``bench.doc`` the Markdown fragment between the bench markers of that file
(``bench.doc=docs/benchmarks.md`` rewrites the table in the docs).
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
