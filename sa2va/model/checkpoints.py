"""Checkpoint loading through explicit key maps; every mismatch is reported and fails.

Four sources, one rule (nothing is loaded unless every key and shape matches, apart from keys
the caller names as expected-missing):

* HF ``InternVL3-*-hf`` folders: read by transformers' ``from_pretrained`` in
  :func:`sa2va.model.mllm.build_mllm`; :func:`check_loading_info` turns its loading report
  into an error.
* SAM 2 ``.pt`` files (``{"model": state_dict}``): :func:`load_sam2_checkpoint`; the keys are
  the ``sam2`` package's own names, so the map is the identity.
* Official Sa2VA releases (the xtuner ``.pth`` of training runs, or the safetensors of the
  ``ByteDance/Sa2VA-*`` folders): :func:`load_official_sa2va`, through
  :func:`official_to_sa2va` (the key map is written out there).
* This project's own training checkpoints (Lightning ``.ckpt`` files or DeepSpeed ZeRO
  checkpoint folders): :func:`load_trained` rebuilds the architecture from the checkpoint's
  own config with ``load_pretrained=False`` and loads every weight strictly, so a checkpoint
  can never fall back to pretrained weights (an earlier converter loaded the trained
  checkpoint non-strictly over a pretrained build, so two checkpoints exported one model).

Files are read with ``torch.load(weights_only=True)`` or safetensors; no remote code runs.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model; the message lists them."""


@dataclass
class LoadReport:
    """What loading ``source`` into a module found (keys in the module's naming)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    expected_missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 10) -> str:
        def listing(keys: Sequence[Any]) -> str:
            shown = ", ".join(str(k) for k in keys[:limit])
            return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")

        lines = [
            f"{self.source}: {len(self.loaded)} tensors loaded, "
            f"{len(self.expected_missing)} left as built (expected missing)"
        ]
        if self.missing:
            lines.append(f"  missing from the checkpoint: {listing(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected in the checkpoint: {listing(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k} checkpoint {a} vs model {b}" for k, a, b in self.mismatched]
            lines.append(f"  shape mismatch: {listing(shapes)}")
        return "\n".join(lines)

    def raise_if_failed(self) -> LoadReport:
        if not self.ok:
            raise CheckpointMismatchError(self.summary())
        return self


def _allowed_missing(patterns: Sequence[str]) -> Callable[[str], bool]:
    """Exact keys and glob patterns (``sam2.*``) -> a test for one key."""
    exact = {p for p in patterns if not any(c in p for c in "*?[")}
    globs = [p for p in patterns if p not in exact]
    return lambda key: key in exact or any(fnmatch.fnmatchcase(key, g) for g in globs)


def compare_state_dict(
    module: nn.Module,
    state: Mapping[str, Tensor],
    source: str,
    expected_missing: Sequence[str] = (),
) -> LoadReport:
    """Compare checkpoint keys and shapes with ``module.state_dict()``.

    ``expected_missing`` holds keys or glob patterns (``sam2.*``) of module keys the
    checkpoint may lack; they keep the values the module was built with.
    """
    own = module.state_dict()
    allowed = _allowed_missing(expected_missing)
    report = LoadReport(source=source)
    for key, tensor in own.items():
        if key not in state:
            target = report.expected_missing if allowed(key) else report.missing
            target.append(key)
        elif tuple(state[key].shape) != tuple(tensor.shape):
            report.mismatched.append((key, tuple(state[key].shape), tuple(tensor.shape)))
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in state if k not in own]
    return report


def load_checked(
    module: nn.Module,
    state: Mapping[str, Tensor],
    source: str,
    expected_missing: Sequence[str] = (),
) -> LoadReport:
    """Load ``state`` into ``module`` only if every key and shape matches (see
    :func:`compare_state_dict`); raise :class:`CheckpointMismatchError` otherwise."""
    report = compare_state_dict(module, state, source, expected_missing).raise_if_failed()
    module.load_state_dict(dict(state), strict=not report.expected_missing)
    log.info("%s", report.summary())
    return report


# ---------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, a folder of safetensors shards, or a torch file
    (read with ``weights_only=True``).

    ``key`` selects a nested state dict (SAM 2: ``"model"``); without it a torch file holding
    ``{"state_dict": ...}`` (mmengine/xtuner) is unwrapped.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.is_dir():
        from safetensors.torch import load_file

        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise ValueError(f"{path}: folder holds no .safetensors files")
        return {k: v for shard in shards for k, v in load_file(shard).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError/RuntimeError/EOFError/...
        raise ValueError(f"{path}: cannot read as a weights-only torch file ({error})") from error
    if key is not None:
        if not isinstance(loaded, Mapping) or key not in loaded:
            found = list(loaded)[:5] if isinstance(loaded, Mapping) else type(loaded).__name__
            raise ValueError(f"{path}: expected {{{key!r}: state_dict}}, found {found}")
        loaded = loaded[key]
    elif isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return dict(loaded)


# ------------------------------------------------------------------- (a) HF InternVL


def check_loading_info(info: Mapping[str, Any], source: str) -> None:
    """Fail on any key transformers' ``from_pretrained(..., output_loading_info=True)`` could
    not place: it only warns, and a missing key would keep its random initialisation."""
    report = LoadReport(
        source=source,
        missing=sorted(info.get("missing_keys") or ()),
        unexpected=sorted(info.get("unexpected_keys") or ()),
        mismatched=sorted(info.get("mismatched_keys") or ()),
    )
    errors = list(info.get("error_msgs") or ())
    if errors:
        raise CheckpointMismatchError(f"{source}: " + "; ".join(errors))
    report.raise_if_failed()


# -------------------------------------------------------------------------- (b) SAM 2


def load_sam2_checkpoint(
    sam2: nn.Module, path: str | Path, expected_missing: Sequence[str] = ()
) -> LoadReport:
    """Load a SAM 2 release (``sam2_hiera_large.pt``: ``{"model": state_dict}``) into a
    ``LanguagePromptedSAM2`` built from ``conf/model/sam2``; its keys are the package's names.

    The official HF release's ``.g_weight`` (Meta: ``.gamma``) is renamed back. A mismatch
    says first when it comes from a SAM 2.0 file given to a 2.1 config, or the reverse.
    """
    from sa2va.model.sam2 import rename_release_keys, sam2_version_mismatch

    state = read_state_dict(path, key=None if str(path).endswith(".safetensors") else "model")
    state = rename_release_keys(state)
    source = f"SAM2 checkpoint {path}"
    report = compare_state_dict(sam2, state, source, expected_missing)
    if not report.ok:
        cause = sam2_version_mismatch(list(sam2.state_dict()), list(state))
        if cause:
            raise CheckpointMismatchError(f"{cause}\n{report.summary()}")
    return load_checked(sam2, state, source, expected_missing)


# --------------------------------------------------------------- (c) official Sa2VA
#
# The official Sa2VA model (xtuner, `projects/llava_sam2`) holds the original InternVL chat
# model as `mllm.model` and SAM 2 as `grounding_encoder.sam2_model`; its HF release drops the
# `mllm.model.` prefix and renames `.gamma` to `.g_weight` (tools/convert_to_hf.py). The
# InternVL names map to transformers' HF-native InternVL as in transformers'
# convert_internvl_weights_to_hf.py; a fused `qkv` / `wqkv` weight is split into q/k/v.

# (official prefix, our prefix), first match wins
OFFICIAL_PREFIXES: list[tuple[str, str]] = [
    ("mllm.model.vision_model.", "mllm.model.vision_tower."),
    ("mllm.model.mlp1.", "mllm.model.multi_modal_projector."),
    ("mllm.model.language_model.model.", "mllm.model.language_model."),
    ("mllm.model.language_model.lm_head.", "mllm.lm_head."),
    ("mllm.model.language_model.output.", "mllm.lm_head."),  # InternLM2
    ("grounding_encoder.sam2_model.", "sam2."),
    ("text_hidden_fcs.", "text_hidden_fcs."),
]
# HF release layout -> training layout
RELEASE_PREFIXES: list[tuple[str, str]] = [
    ("vision_model.", "mllm.model.vision_model."),
    ("mlp1.", "mllm.model.mlp1."),
    ("language_model.", "mllm.model.language_model."),
]
# (official name, our name) after the vision-tower / LLM prefix; `{n}` stands for a layer
# index, `{p}` for the rest of the name. Both directions read these tables: loading here,
# export in `sa2va.model.release_layout`.
# InternViT (original) <-> transformers' InternVLVisionModel
VISION_NAMES: list[tuple[str, str]] = [
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("embeddings.patch_embedding.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("encoder.layers.{n}.ls1", "encoder.layer.{n}.lambda_1"),
    ("encoder.layers.{n}.ls2", "encoder.layer.{n}.lambda_2"),
    ("encoder.layers.{n}.attn.proj.{p}", "encoder.layer.{n}.attention.projection_layer.{p}"),
    ("encoder.layers.{n}.attn.q_norm.{p}", "encoder.layer.{n}.attention.q_norm.{p}"),
    ("encoder.layers.{n}.attn.k_norm.{p}", "encoder.layer.{n}.attention.k_norm.{p}"),
    ("encoder.layers.{n}.norm1.{p}", "encoder.layer.{n}.layernorm_before.{p}"),
    ("encoder.layers.{n}.norm2.{p}", "encoder.layer.{n}.layernorm_after.{p}"),
    ("encoder.layers.{n}.mlp.{p}", "encoder.layer.{n}.mlp.{p}"),
]
# InternLM2 <-> Llama names (the LLM of InternVL2.5-8B/26B, Sa2VA-8B/26B)
INTERNLM2_NAMES: list[tuple[str, str]] = [
    ("tok_embeddings.{p}", "embed_tokens.{p}"),
    ("norm.{p}", "norm.{p}"),
    ("layers.{n}.attention.wo.{p}", "layers.{n}.self_attn.o_proj.{p}"),
    ("layers.{n}.feed_forward.w1.{p}", "layers.{n}.mlp.gate_proj.{p}"),
    ("layers.{n}.feed_forward.w3.{p}", "layers.{n}.mlp.up_proj.{p}"),
    ("layers.{n}.feed_forward.w2.{p}", "layers.{n}.mlp.down_proj.{p}"),
    ("layers.{n}.attention_norm.{p}", "layers.{n}.input_layernorm.{p}"),
    ("layers.{n}.ffn_norm.{p}", "layers.{n}.post_attention_layernorm.{p}"),
]
# mlp1 = Sequential(LayerNorm, Linear, GELU, Linear): official index -> our name
MLP1_NAMES = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}


@cache
def _name_pattern(template: str) -> re.Pattern[str]:
    """A name template of the tables above as a regex: `{n}` a layer index, `{p}` the rest."""
    pattern = re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)")
    return re.compile(pattern.replace(re.escape("{p}"), r"(?P<p>.+)"))


def rename_by_table(
    name: str, table: Sequence[tuple[str, str]], to_official: bool = False
) -> str | None:
    """``name`` renamed by the first matching (official, ours) pair of ``table``, from the
    official name to ours (or back with ``to_official``); None when no pair matches."""
    for official, ours in table:
        source, target = (ours, official) if to_official else (official, ours)
        if match := _name_pattern(source).fullmatch(name):
            return target.format(**match.groupdict())
    return None


VISION_QKV = re.compile(r"^encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
INTERNLM2_WQKV = re.compile(r"^layers\.(\d+)\.attention\.wqkv\.weight$")


def split_internlm2_wqkv(weight: Tensor, num_heads: int, num_kv_heads: int) -> list[Tensor]:
    """InternLM2's fused ``wqkv`` rows are grouped per KV head: [q_1..q_g, k, v] x head_dim
    for each of the ``num_kv_heads`` groups (g = num_heads / num_kv_heads)."""
    groups = num_heads // num_kv_heads
    head_dim = weight.shape[0] // (num_kv_heads * (groups + 2))
    blocks = weight.view(num_kv_heads, groups + 2, head_dim, weight.shape[-1])
    q = blocks[:, :groups].reshape(-1, weight.shape[-1])
    k = blocks[:, groups].reshape(-1, weight.shape[-1])
    v = blocks[:, groups + 1].reshape(-1, weight.shape[-1])
    return [q.contiguous(), k.contiguous(), v.contiguous()]


def _training_layout(key: str) -> str:
    """HF-release key -> the training (xtuner) key it was converted from."""
    for release, training in RELEASE_PREFIXES:
        if key.startswith(release):
            return training + key[len(release) :]
    if key.startswith("grounding_encoder."):
        return re.sub(r"\.g_weight$", ".gamma", key)
    return key


def _map_official(
    key: str, tensor: Tensor, text_model_type: str, num_heads: int, num_kv_heads: int
) -> dict[str, Tensor]:
    """One official (training layout) tensor -> our key(s); fused q/k/v become three."""
    old, new = next(((o, n) for o, n in OFFICIAL_PREFIXES if key.startswith(o)), ("", key))
    rest = key[len(old) :]
    if new == "mllm.model.vision_tower.":
        if match := VISION_QKV.match(rest):
            layer, kind = match.groups()
            return {
                f"{new}encoder.layer.{layer}.attention.{part}_proj.{kind}": chunk.contiguous()
                for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True)
            }
        return {new + (rename_by_table(rest, VISION_NAMES) or rest): tensor}
    if new == "mllm.model.multi_modal_projector.":
        index, _, param = rest.partition(".")
        return {f"{new}{MLP1_NAMES.get(index, index)}.{param}": tensor}
    if new == "mllm.model.language_model." and text_model_type == "llama":
        if match := INTERNLM2_WQKV.match(rest):
            parts = split_internlm2_wqkv(tensor, num_heads, num_kv_heads)
            return {
                f"{new}layers.{match.group(1)}.self_attn.{part}_proj.weight": chunk
                for part, chunk in zip("qkv", parts, strict=True)
            }
        return {new + (rename_by_table(rest, INTERNLM2_NAMES) or rest): tensor}
    return {new + rest: tensor}


def official_to_sa2va(
    state: Mapping[str, Tensor], text_model_type: str, num_heads: int, num_kv_heads: int
) -> dict[str, Tensor]:
    """Rename an official Sa2VA state dict (either layout) to this project's module names.

    ``text_model_type`` is the LLM family of the target (``qwen2``: names kept; ``llama``:
    the checkpoint holds InternLM2 names). Keys outside the map keep their name, so the
    strict comparison reports them as unexpected.
    """
    if any(".lora_" in k or ".base_model.model." in k for k in state):
        raise ValueError(
            "official checkpoint holds unmerged LoRA weights (lora_*/base_model.model.*): "
            "merge them first (the official tools/convert_to_hf.py does)"
        )
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        out.update(
            _map_official(_training_layout(key), tensor, text_model_type, num_heads, num_kv_heads)
        )
    return out


def load_official_sa2va(
    model: nn.Module,
    path: str | Path,
    include: Sequence[str] | None = None,
    expected_missing: Sequence[str] = (),
) -> LoadReport:
    """Load an official Sa2VA checkpoint into a :class:`~sa2va.model.sa2va.Sa2VA`.

    ``include`` (prefixes in our naming, e.g. ``["sam2."]``) loads only those parts — how
    the user's training guide starts an 8B model from Sa2VA-26B, whose LLM and projector
    shapes differ; every other key is then expected-missing. Call it before LoRA is added.
    """
    if ".base_model.model." in "".join(n for n, _ in model.named_parameters()):
        raise ValueError("load_official_sa2va: load official weights before adding LoRA")
    text = model.mllm.config.text_config
    state = official_to_sa2va(
        read_state_dict(path),
        text.model_type,
        text.num_attention_heads,
        text.num_key_value_heads,
    )
    allowed_missing = list(expected_missing)
    if include is not None:
        prefixes = tuple(include)
        state = {k: v for k, v in state.items() if k.startswith(prefixes)}
        allowed_missing += [k for k in model.state_dict() if not k.startswith(prefixes)]
    return load_checked(model, state, f"official Sa2VA checkpoint {path}", allowed_missing)


# ------------------------------------------------------------ this project's checkpoints


# ------------------------------------------------------------------ start-up checks


def check_pretrained_files(cfg: Mapping[str, Any]) -> None:
    """A real-size model (``requires_pretrained: true`` in its config) trains only from local
    pretrained files: without them it would be a randomly initialised 1-26 B model."""
    if not cfg.get("requires_pretrained"):
        return
    model = cfg["model"]
    name = model.get("name")
    needs: list[tuple[str, str, Callable[[Path], bool], Any]] = [
        ("model.mllm.path", "SA2VA_MLLM_PATH", Path.is_dir, model["mllm"].get("path")),
        ("model.sam2_ckpt", "SA2VA_SAM2_CKPT", Path.is_file, model.get("sam2_ckpt")),
    ]
    problems = []
    for key, env, exists, value in needs:
        if not value:
            problems.append(f"model={name} needs {key} (or ${env}): none given")
        elif not exists(Path(str(value)).expanduser()):
            problems.append(f"{key}={value}: not found")
    init = model.get("init_from_sa2va") or {}
    if init and not Path(str(init.get("path"))).expanduser().exists():
        problems.append(f"model.init_from_sa2va.path={init.get('path')}: not found")
    if problems:
        raise FileNotFoundError("; ".join(problems) + " (see docs/real_models.md)")
