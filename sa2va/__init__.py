"""sa2va: fine-tune Sa2VA (InternVL + SAM2 through a [SEG] token) for OCT vessel segmentation."""

from omegaconf import OmegaConf

from sa2va.utils import REPO_ROOT

OmegaConf.register_new_resolver("sa2va_root", lambda: str(REPO_ROOT), replace=True)
