"""nnU-Net v2 entry point: `python -m sa2va.nnunet [nnunet.epochs=50] [data=oct data.root=...]`.

Exports this repo's splits to nnU-Net, trains its 2D configuration with nnU-Net's own
planning and trainer, predicts ``eval.split`` and writes the files `sa2va.eval` writes
(``metrics.json``, ``per_image.csv``, ``per_video.csv``, ``results.md``), so
`python -m sa2va.compare <dir> --task eval,nnunet` puts it in the same table.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from sa2va.evaluation.nnunet import run_nnunet
from sa2va.training.config import register_schemas
from sa2va.utils import CONF_DIR

register_schemas()


@hydra.main(config_path=CONF_DIR, config_name="nnunet", version_base="1.3")
def main(cfg: DictConfig) -> float:
    OmegaConf.resolve(cfg)
    summary = run_nnunet(cfg)
    return summary["results"]["default"]["per_image"]["dice"]["mean"]


if __name__ == "__main__":
    main()
