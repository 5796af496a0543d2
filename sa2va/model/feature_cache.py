"""Frozen-encoder feature caching: compute each frame's encoder output once, reuse it later.

With the SAM2 image encoder and/or the InternVL vision tower frozen and no random augmentation,
an encoder's output for a frame depends only on the frame's file and view size. Training then
recomputes the same features every epoch; :class:`FeatureCache` keeps them (in memory, least
recently used out first within a byte budget, optionally also on disk) and
:func:`cached_encoders` gives ``Sa2VA.forward`` stand-ins for both encoders that read from it
(the model calls them in the encoders' place; no module is changed).

What is cached, so that training stays exact:

* SAM2: the image encoder's ``backbone_fpn`` (trunk + neck), i.e. *before*
  ``sam_mask_decoder.conv_s0/conv_s1``, which ``SAM2Base.forward_image`` applies afterwards.
  Those convs belong to the mask decoder, which may be training. The position encodings
  depend only on the feature size and are recomputed.
* InternVL: the vision tower's ``last_hidden_state``, i.e. before pixel shuffle and the
  multimodal projector (which may be training). Only when the model reads the last layer
  (``vision_feature_layer == -1``) and every MLLM frame is one tile, so that rows map to frames.

The cache switches itself off per encoder and per call: when an encoder has a trainable
parameter or a stochastic layer in training mode (dropout, drop path), or when a batch carries
no ``frame_keys`` (the data module leaves them out while augmentation is on). Entries are
dropped when an encoder's weights change (loaded, moved to another device); disk entries are
filed under a digest of the encoder's weights.

Memory: SAM2 at 1024 px keeps 256 x (256^2 + 128^2 + 64^2) values per frame before the
decoder convs, about 88 MB in float32; size ``max_gb`` (and ``disk_dir``) for the data set.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sa2va.model.processor import key_frame_indices
from sa2va.utils import atomic_write_bytes

SAM2_ENCODER = "sam2_image_encoder"
VISION_TOWER = "vision_tower"
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _is_stochastic(module: nn.Module) -> bool:
    """A layer that draws random numbers in training mode (torch dropout, sam2/HF drop path,
    HF attention dropout)."""
    if isinstance(module, _DROPOUT):
        return module.p > 0
    values = (getattr(module, name, 0) for name in ("drop_prob", "attention_dropout"))
    return any(isinstance(v, int | float) and v > 0 for v in values)


def cacheable(encoder: nn.Module) -> bool:
    """True when the encoder's output is a fixed function of its input: nothing trains and
    nothing is random."""
    if any(p.requires_grad for p in encoder.parameters()):
        return False
    return not (encoder.training and any(_is_stochastic(m) for m in encoder.modules()))


def _tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    return chain(module.named_parameters(), module.named_buffers())


def weights_state(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """Cheap identity of a module's current weights: storage and in-place version counters
    (``load_state_dict`` and ``.to()`` change them)."""
    return tuple((t.data_ptr(), t._version) for _, t in _tensors(module))


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's weights, naming its disk entries across processes and runs."""
    digest = hashlib.sha256()
    for name, tensor in _tensors(module):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().flatten().view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


class FeatureCache:
    """Per-frame encoder outputs, keyed by encoder (``namespace``) and frame key.

    ``max_gb`` bounds the in-memory entries (least recently used are evicted first);
    ``disk_dir`` adds a persistent store (one safetensors file per frame and encoder);
    ``store_device`` is where in-memory entries live (``cpu`` spares GPU memory; ``null``
    keeps them where they were computed).
    """

    def __init__(
        self, max_gb: float = 4.0, disk_dir: str | None = None, store_device: str | None = "cpu"
    ) -> None:
        if max_gb < 0:
            raise ValueError(f"feature_cache.max_gb must be >= 0, got {max_gb}")
        self.max_bytes = int(max_gb * 2**30)
        self.disk_dir = Path(disk_dir).expanduser() if disk_dir else None
        self.store_device = torch.device(store_device) if store_device else None
        self.nbytes = 0
        self.stats: Counter[str] = Counter()  # hits, disk_hits, misses, evictions
        self._entries: OrderedDict[tuple[str, str], tuple[Tensor, ...]] = OrderedDict()
        self._states: dict[str, tuple[tuple[int, int], ...]] = {}
        self._digests: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._states.clear()
        self._digests.clear()
        self.nbytes = 0

    def bind(self, namespace: str, encoder: nn.Module) -> None:
        """Forget ``namespace``'s entries when ``encoder``'s weights changed since last time."""
        state = weights_state(encoder)
        if self._states.get(namespace) == state:
            return
        for key in [k for k in self._entries if k[0] == namespace]:
            self._drop(key)
        self._states[namespace] = state
        if self.disk_dir is not None:
            self._digests[namespace] = weights_digest(encoder)

    def rows(
        self,
        namespace: str,
        keys: Sequence[str],
        compute: Callable[[Tensor], Sequence[Tensor]],
        device: torch.device,
    ) -> list[Tensor]:
        """Outputs for a batch of frames: one tensor per output level, batch dim = ``keys``.

        ``compute(index)`` runs the encoder on the rows ``index`` (1-D long tensor) that are
        neither in memory nor on disk and returns its output levels for just those rows.
        Call :meth:`bind` for ``namespace`` first.
        """
        found: list[tuple[Tensor, ...] | None] = [self._get(namespace, k) for k in keys]
        missing = [i for i, entry in enumerate(found) if entry is None]
        self.stats["hits"] += len(keys) - len(missing)
        self.stats["misses"] += len(missing)
        if missing:
            with torch.no_grad():
                levels = compute(torch.tensor(missing, device=device))
            for row, i in enumerate(missing):
                found[i] = tuple(level[row].detach().clone() for level in levels)
                self._put(namespace, keys[i], found[i])
        entries: list[tuple[Tensor, ...]] = found  # type: ignore[assignment]  # all filled now
        return [
            _stack([entry[level].to(device) for entry in entries])
            for level in range(len(entries[0]))
        ]

    # ---- storage ------------------------------------------------------------------------------
    def _get(self, namespace: str, key: str) -> tuple[Tensor, ...] | None:
        entry = self._entries.get((namespace, key))
        if entry is not None:
            self._entries.move_to_end((namespace, key))
            return entry
        path = self._disk_path(namespace, key)
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(path, "pt") as stored:
            orders = stored.metadata()
            entry = tuple(
                _with_order(stored.get_tensor(str(i)), orders[str(i)]) for i in range(len(orders))
            )
        self.stats["disk_hits"] += 1
        self._remember(namespace, key, entry)
        return entry

    def _put(self, namespace: str, key: str, entry: tuple[Tensor, ...]) -> None:
        path = self._disk_path(namespace, key)
        if path is not None:
            from safetensors.torch import save

            tensors, metadata = {}, {}
            for i, tensor in enumerate(entry):  # stored contiguous, with the layout to restore
                order = _dim_order(tensor)
                tensors[str(i)] = tensor.permute(order).contiguous()
                metadata[str(i)] = ",".join(map(str, order))
            atomic_write_bytes(path, save(tensors, metadata))
        self._remember(namespace, key, entry)

    def _remember(self, namespace: str, key: str, entry: tuple[Tensor, ...]) -> None:
        if self.store_device is not None:
            entry = tuple(t.to(self.store_device) for t in entry)
        size = sum(t.numel() * t.element_size() for t in entry)
        if size > self.max_bytes:
            return
        while self.nbytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.stats["evictions"] += 1
        self._entries[(namespace, key)] = entry
        self.nbytes += size

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= sum(t.numel() * t.element_size() for t in entry)

    def _disk_path(self, namespace: str, key: str) -> Path | None:
        if self.disk_dir is None:
            return None
        name = hashlib.sha1(key.encode()).hexdigest()
        return self.disk_dir / namespace / self._digests[namespace][:16] / f"{name}.safetensors"


def _dim_order(tensor: Tensor) -> list[int]:
    """Dimensions from outermost to innermost in memory (channels-last maps: H, W, C)."""
    return sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))


def _with_order(permuted: Tensor, order: str) -> Tensor:
    """Undo ``permute(order)``: the original shape with the original memory layout."""
    dims = [int(d) for d in order.split(",")] if order else []
    return permuted.permute([dims.index(d) for d in range(len(dims))])


def _stack(rows: list[Tensor]) -> Tensor:
    """Stack rows into a batch that keeps their memory layout (SAM2's neck returns
    channels-last maps; convolutions round differently on a contiguous copy)."""
    order = _dim_order(rows[0])
    batch = torch.stack([row.permute(order) for row in rows])
    return batch.permute([0] + [1 + order.index(d) for d in range(len(order))])


@dataclass(frozen=True)
class CachedEncoders:
    """Stand-ins for a model's frozen encoders on one batch, reading its frames from the
    cache (None: the encoder runs itself). ``sam2`` takes the place of SAM 2's image encoder
    (:meth:`~sa2va.model.sam2.LanguagePromptedSAM2.image_features`), ``vision`` of the
    InternVL vision tower's last hidden state (``Sa2VA.seg_embeddings``)."""

    sam2: Callable[[Tensor], dict[str, Any]] | None = None
    vision: Callable[[Tensor], Tensor] | None = None


def _sam2_encoder(
    encoder: nn.Module, cache: FeatureCache, keys: list[str]
) -> Callable[[Tensor], dict[str, Any]]:
    def encode(sample: Tensor) -> dict[str, Any]:
        if sample.shape[0] != len(keys):
            raise RuntimeError(f"feature cache: {sample.shape[0]} images for {len(keys)} keys")
        fpn = cache.rows(
            SAM2_ENCODER, keys, lambda index: encoder(sample[index])["backbone_fpn"], sample.device
        )
        pos = [encoder.neck.position_encoding(x).to(x.dtype) for x in fpn]
        return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}

    return encode


def _vision_tower(tower: nn.Module, cache: FeatureCache, keys: list[str]) -> Callable[..., Any]:
    def encode(pixel_values: Tensor) -> Tensor:
        if pixel_values.shape[0] != len(keys):
            raise RuntimeError(f"feature cache: {pixel_values.shape[0]} tiles for {len(keys)} keys")
        (hidden,) = cache.rows(
            VISION_TOWER,
            keys,
            lambda index: [tower(pixel_values=pixel_values[index]).last_hidden_state],
            pixel_values.device,
        )
        return hidden

    return encode


def cached_encoders(model: nn.Module, batch: Mapping[str, Any]) -> CachedEncoders:
    """Cache-reading stand-ins for the cacheable encoders of ``model`` (a ``Sa2VA``) on
    ``batch``: none without ``model.feature_cache`` or without ``batch["frame_keys"]``.

    Row order is the model's: SAM2 encodes every frame of every sample in order (``decode``),
    the vision tower each sample's key frames (``Sa2VAProcessor``).
    """
    cache: FeatureCache | None = getattr(model, "feature_cache", None)
    frames = batch.get("frame_keys")
    if cache is None or not frames or any(f is None for f in frames):
        return CachedEncoders()
    sam2, vision = None, None
    sam2_encoder = model.sam2.image_encoder
    if cacheable(sam2_encoder):
        cache.bind(SAM2_ENCODER, sam2_encoder)
        size = model.sam2.image_size
        sam2 = _sam2_encoder(sam2_encoder, cache, [f"{key}@{size}" for s in frames for key in s])
    tower = model.mllm.model.vision_tower
    size = model.mllm.config.vision_config.image_size
    keys = [
        f"{sample[i]}@{size}"
        for sample in frames
        for i in key_frame_indices(len(sample), model.processor.mllm_frames)
    ]
    one_tile_per_frame = batch["pixel_values"].shape[0] == len(keys)
    last_layer = model.mllm.config.vision_feature_layer == -1
    if one_tile_per_frame and last_layer and cacheable(tower):
        cache.bind(VISION_TOWER, tower)
        vision = _vision_tower(tower, cache, keys)
    return CachedEncoders(sam2, vision)
