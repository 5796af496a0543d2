"""Prediction entry point: masks for images, folders of frames and videos with a trained model.

    python -m sa2va.predict ckpt_path=CKPT input=IMAGE|FOLDER|VIDEO.mp4 prompt="..."
    python -m sa2va.predict ckpt_path=CKPT input=frames/ 'prompt=[Segment the vessels., ...]'

Writes, under ``predict.output_dir`` (created only when everything succeeded):
``masks/<frame>_<label>.png`` (0/255, one per frame per [SEG]; label ``p<i>`` for prompt i,
``p<i>_<j>`` when prompt i yields several masks), optional ``probs/`` (16-bit PNG, value =
round(p * 65535), or float32 ``.npy``), ``overlays/<frame>.png`` and ``predictions.json``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from sa2va.inference.predict import (
    predict,
)
from sa2va.summary import predict_summary
from sa2va.training.config import register_schemas
from sa2va.utils import CONF_DIR

register_schemas()


@hydra.main(config_path=CONF_DIR, config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    print(predict_summary(predict(cfg)))


if __name__ == "__main__":
    main()
