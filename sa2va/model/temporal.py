"""Temporal modules on SAM2's image features: the three designs a SAMUS-based
echocardiography segmentation study compares (temporal adapter, temporal attention, TRA).

Each works on the last-level SAM2 image features (N, C, h, w) of the frames of one or more
clips (``lengths``: frames per clip, in batch order) and mixes information only between the
frames of the same clip. All three are a zero-initialised residual branch
(:class:`TemporalResidual`): the block is the identity at initialisation, so a pretrained
model segments exactly as before until the branch learns something.

* ``adapter``: ST-Adapter (Pan et al., NeurIPS 2022): 1x1 down-projection, depthwise
  convolution over time (kernel 3, one filter per channel), 1x1 up-projection.
* ``attention``: self-attention across the frames of a clip at each spatial position
  (divided space-time attention's temporal half, TimeSformer).
* ``tra``: local temporal relation (a depthwise temporal convolution) whose output feeds
  temporal self-attention, UniFormer's "local convolution, then global attention".

The study's TRA code is closed; these follow the designs' published descriptions. The
layers are torch's (``Conv3d``, ``MultiheadAttention``, ``LayerNorm``).

A video longer than the training clip is processed in windows (:func:`window_starts`,
:func:`windowed`): overlapping windows' outputs are averaged frame by frame.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

TEMPORAL_KINDS = ("none", "adapter", "attention", "tra")
HEAD_DIM = 32  # attention heads of 32 channels (SAM2 widths are multiples of 32)


def _zero_init(layer: nn.Module) -> nn.Module:
    """Zero weights and bias: the residual branch adds exactly 0 before training."""
    for param in layer.parameters():
        nn.init.zeros_(param)
    return layer


class TemporalResidual(nn.Module, ABC):
    """``x + branch(x)`` over each clip's frames; ``branch`` ends in a zero-initialised layer.

    Subclasses define :meth:`branch` on one clip as a (1, C, T, h, w) tensor. Clips are
    processed one by one, so no information passes between clips (or videos) of a batch.
    """

    @abstractmethod
    def branch(self, clip: Tensor) -> Tensor:
        """(1, C, T, h, w) clip features -> the residual to add, same shape."""

    def forward(self, features: Tensor, lengths: Sequence[int]) -> Tensor:
        """(N, C, h, w) features of clips of ``lengths`` frames (sum = N) -> same shape."""
        if sum(lengths) != features.shape[0]:
            raise ValueError(f"clip lengths {list(lengths)} do not add up to {features.shape[0]}")
        clips = [
            clip + self.branch(clip.transpose(0, 1).unsqueeze(0))[0].transpose(0, 1)
            for clip in features.split(list(lengths))
        ]
        return torch.cat(clips)


def _temporal_conv(channels: int, kernel: int) -> nn.Conv3d:
    """Depthwise convolution over time only (kernel k x 1 x 1, zero padding at clip ends)."""
    return nn.Conv3d(
        channels, channels, (kernel, 1, 1), padding=(kernel // 2, 0, 0), groups=channels
    )


class TemporalAdapter(TemporalResidual):
    """ST-Adapter: bottleneck (C -> C/ratio) with a depthwise temporal convolution."""

    def __init__(self, channels: int, ratio: int = 4, kernel: int = 3) -> None:
        super().__init__()
        hidden = max(channels // ratio, 1)
        self.down = nn.Conv3d(channels, hidden, 1)
        self.conv = _temporal_conv(hidden, kernel)
        self.up = _zero_init(nn.Conv3d(hidden, channels, 1))

    def branch(self, clip: Tensor) -> Tensor:
        return self.up(self.conv(self.down(clip)))


class TemporalAttention(TemporalResidual):
    """Pre-norm self-attention over the T frames at every spatial position."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, max(channels // HEAD_DIM, 1), batch_first=True)
        _zero_init(self.attn.out_proj)

    def attend(self, clip: Tensor) -> Tensor:
        """(1, C, T, h, w) -> attention over T, one sequence per position, same shape."""
        _, c, t, h, w = clip.shape
        tokens = self.norm(clip[0].permute(2, 3, 1, 0).reshape(h * w, t, c))
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return out.reshape(h, w, t, c).permute(3, 2, 0, 1).unsqueeze(0)

    def branch(self, clip: Tensor) -> Tensor:
        return self.attend(clip)


class TemporalRelationAggregation(TemporalAttention):
    """TRA: a depthwise temporal convolution (local relation) feeding temporal attention."""

    def __init__(self, channels: int, kernel: int = 3) -> None:
        super().__init__(channels)
        self.local = _temporal_conv(channels, kernel)

    def branch(self, clip: Tensor) -> Tensor:
        return self.attend(self.local(clip))


def build_temporal(kind: str, channels: int) -> TemporalResidual | None:
    """The module for ``model.temporal`` (None for ``none``)."""
    designs: dict[str, Callable[[int], TemporalResidual]] = {
        "adapter": TemporalAdapter,
        "attention": TemporalAttention,
        "tra": TemporalRelationAggregation,
    }
    if kind not in TEMPORAL_KINDS:
        raise ValueError(f"model.temporal must be one of {TEMPORAL_KINDS}, got {kind!r}")
    return designs[kind](channels) if kind in designs else None


def window_starts(num_frames: int, window: int, overlap: int) -> list[int]:
    """First frame of each window covering ``num_frames`` frames, consecutive windows sharing
    ``overlap`` frames; the last window ends on the last frame (it may share more)."""
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 1 and 0 <= overlap < window, got {window}, {overlap}")
    if num_frames <= window:
        return [0]
    starts = list(range(0, num_frames - window, window - overlap))
    return starts + [num_frames - window]


def windowed(fn: Callable[[Tensor], Tensor], x: Tensor, window: int, overlap: int) -> Tensor:
    """``fn`` on overlapping windows of a (T, ...) sequence; frames in several windows get
    the mean of their outputs."""
    total = torch.zeros_like(x)
    count = x.new_zeros(x.shape[0])
    for start in window_starts(x.shape[0], window, overlap):
        stop = min(start + window, x.shape[0])
        total[start:stop] += fn(x[start:stop])
        count[start:stop] += 1
    return total / count.view(-1, *([1] * (x.dim() - 1)))
