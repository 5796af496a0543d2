"""Export a trained checkpoint to a self-contained folder; load it back for eval/predict.

    python -m sa2va.export ckpt_path=outputs/.../checkpoints/last.ckpt out=exports/run1
    python -m sa2va.export ckpt_path=.../last.ckpt/ out=... merge_lora=false   # DeepSpeed folder
    python -m sa2va.export ckpt_path=... out=... format=official   # the ByteDance/Sa2VA-* layout

``format=project`` (the default) writes this project's folder (temp name, renamed when
complete)::

    model.safetensors  every weight of the trained model (LoRA merged, or kept as an adapter)
    config.json        {"model_class", "model": the Sa2VA config (its LoRA spec, or none
                       once merged), "threshold"}
    mllm/              InternVL config.json, tokenizer, image processor (preprocessor_config.json)
    manifest.json      source checkpoint and its sha256, LoRA merged or not, weights sha256
    README.md          the model card (sa2va.training.model_card): architecture, data and
                       splits, loss and freeze policy, metrics of the last sa2va.eval,
                       threshold, intended use, Hub metadata and the upload command

``format=official`` writes the HF release layout of the official Sa2VA (LoRA merged first)::

    model.safetensors  official key names (sa2va.model.release_layout); sharded as
                       model-0000i-of-0000n.safetensors + model.safetensors.index.json
                       when larger than max_shard_size
    config.json        the official Sa2VAChatConfig fields
    tokenizer files    the trained tokenizer (with its added tokens)
    manifest.json      as above

The official modeling code is not part of this project (and this project never runs remote
code): copy the ``*.py`` files of the official ``projects/sa2va/hf/models/`` into the folder,
as the official ``tools/convert_to_hf.py`` does, and the official Sa2VA loads it from there.

An earlier failure (a converter that built the model from a pretrained file and loaded the
trained checkpoint with ``strict=False``, so two checkpoints exported the same model) cannot
happen here: the architecture is rebuilt from the checkpoint's own
config with ``load_pretrained=False`` (no pretrained file is opened) and every weight must
load strictly, so two different checkpoints always export different models.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from sa2va.summary import export_summary
from sa2va.training.config import register_schemas
from sa2va.training.export import export
from sa2va.utils import CONF_DIR

register_schemas()


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    manifest = export(
        cfg.ckpt_path,
        cfg.out,
        cfg.merge_lora,
        cfg.mllm_path,
        cfg.format,
        cfg.template,
        cfg.max_shard_size,
    )
    print(export_summary(manifest, cfg.out))


if __name__ == "__main__":
    main()
