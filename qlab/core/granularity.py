"""Granularity: which elements of a tensor share one scale (and zero point).

Every granularity is a :class:`Granularity`: it turns a tensor into a 2-D matrix of *groups*
``[n_groups, group_len]`` (one row per scale) and back, and answers the questions the methods ask of it
(how many input columns of a weight share a scale, whether a scale ever spans two rows). Per-group views
may need padding when the group size does not divide the row: the embedded model's 576-wide rows with
groups of 128 give four groups of 128 and a last one of 64. Padding is zeros plus a mask, and the last
group is honestly counted as a group of its own (one more scale).

>>> PerGroup(4).scale_shape((2, 10))      # two rows, groups of 4, 4, 2
(2, 3)
>>> PerGroup(128).columns_per_scale((1536, 576)), PerChannel(0).columns_per_scale((1536, 576))
(128, 576)
"""
from dataclasses import dataclass
import math

import torch


class Granularity:
    """The interface every granularity implements (subclasses are small frozen dataclasses)."""

    def scale_shape(self, shape) -> tuple:
        """Shape of the scale tensor for a tensor of ``shape`` (row-major order = the order of the groups)."""
        raise NotImplementedError

    def to_groups(self, x: torch.Tensor):
        """``x`` -> (groups [n_groups, group_len], mask of real elements or None)."""
        raise NotImplementedError

    def from_groups(self, g: torch.Tensor, shape) -> torch.Tensor:
        """Inverse of :meth:`to_groups` (padding dropped)."""
        raise NotImplementedError

    def n_groups(self, shape) -> int:
        return math.prod(self.scale_shape(tuple(shape)))

    def columns_per_scale(self, shape) -> int:
        """For a weight [out, in]: how many consecutive input columns of a row share one scale. Raises a
        ValueError when scales do not run along the input in row-wise runs (e.g. per input channel)."""
        raise ValueError(f"{self} scales do not cover runs of input columns of a [out, in] weight {tuple(shape)}; "
                         f"use tensor, channel, gN or a bN that divides the row")

    def per_row(self, shape) -> bool:
        """For a weight [out, in]: does every scale belong to a single row? (Then rows of several weights can
        be stacked and quantized together, as GPTQ does for q/k/v.)"""
        return False


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor."""

    def scale_shape(self, shape):
        return ()

    def to_groups(self, x):
        return x.reshape(1, -1), None

    def from_groups(self, g, shape):
        return g.reshape(shape)

    def columns_per_scale(self, shape):
        return shape[-1]

    def __str__(self):
        return "tensor"


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per index along ``axis``: for a Linear weight [out, in], axis=0 is per output channel."""

    axis: int = 0

    def __post_init__(self):
        if not isinstance(self.axis, int):
            raise ValueError(f"the per-channel axis must be an integer, got {self.axis!r}")

    def scale_shape(self, shape):
        return (shape[self.axis],)

    def to_groups(self, x):
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(f"per-channel axis {self.axis} does not exist in a {x.dim()}-d tensor")
        moved = x.movedim(self.axis, 0)
        return moved.reshape(moved.shape[0], -1), None

    def from_groups(self, g, shape):
        moved_shape = list(shape)
        moved_shape.insert(0, moved_shape.pop(self.axis))
        return g.reshape(moved_shape).movedim(0, self.axis)

    def columns_per_scale(self, shape):
        if self.axis not in (0, -len(shape)):
            return super().columns_per_scale(shape)
        return shape[-1]

    def per_row(self, shape):
        return self.axis in (0, -len(shape))

    def __str__(self):
        return "channel" if self.axis == 0 else f"channel@{self.axis}"


@dataclass(frozen=True)
class PerToken(Granularity):
    """One scale per vector along the last dimension (per token for activations [..., hidden])."""

    def scale_shape(self, shape):
        return tuple(shape[:-1])

    def to_groups(self, x):
        return x.reshape(-1, x.shape[-1]), None

    def from_groups(self, g, shape):
        return g.reshape(shape)

    def columns_per_scale(self, shape):
        return shape[-1]

    def per_row(self, shape):
        return True

    def __str__(self):
        return "token"


def _pad_last(x, size):
    """Split the last dim into groups of ``size``, zero-padding the last group; return groups and mask."""
    n = x.shape[-1]
    n_groups = math.ceil(n / size)
    pad = n_groups * size - n
    mask = None
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
        mask = torch.arange(n_groups * size, device=x.device) < n  # [n_groups * size]
        mask = mask.expand(x.shape).reshape(-1, size)
    return x.reshape(-1, size), mask


def _positive_size(size, what):
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"{what} size must be a positive integer, got {size!r}")


@dataclass(frozen=True)
class PerGroup(Granularity):
    """Groups of ``size`` consecutive elements along ``axis`` (default the last dim: the input dim of a
    Linear weight). ``axis=-2`` groups consecutive *tokens* of a [..., T, D] tensor per channel, as KIVI
    does for keys; its scales are laid out [..., D, ceil(T / size)]."""

    size: int
    axis: int = -1

    def __post_init__(self):
        _positive_size(self.size, "group")
        if not isinstance(self.axis, int) or self.axis >= 0:
            raise ValueError(f"the group axis counts from the end (-1, -2, ...), got {self.axis!r}")

    def _moved(self, shape):
        shape = list(shape)
        if -self.axis > len(shape):
            raise ValueError(f"group axis {self.axis} does not exist in a {len(shape)}-d tensor")
        shape.append(shape.pop(self.axis))
        return shape

    def scale_shape(self, shape):
        moved = self._moved(shape)
        return tuple(moved[:-1]) + (math.ceil(moved[-1] / self.size),)

    def to_groups(self, x):
        if self.axis != -1:
            self._moved(x.shape)
            x = x.movedim(self.axis, -1)
        return _pad_last(x, self.size)

    def from_groups(self, g, shape):
        moved = self._moved(shape)
        n_groups = math.ceil(moved[-1] / self.size)
        g = g.reshape(*moved[:-1], n_groups * self.size)[..., : moved[-1]]
        return g.movedim(-1, self.axis) if self.axis != -1 else g.reshape(shape)

    def columns_per_scale(self, shape):
        if self.axis != -1:
            return super().columns_per_scale(shape)
        return self.size

    def per_row(self, shape):
        return self.axis == -1

    def __str__(self):
        return f"g{self.size}" if self.axis == -1 else f"g{self.size}@{self.axis}"


@dataclass(frozen=True)
class PerBlock(Granularity):
    """Blocks of ``size`` consecutive elements of the flattened tensor (bitsandbytes' NF4 blocks)."""

    size: int

    def __post_init__(self):
        _positive_size(self.size, "block")

    def scale_shape(self, shape):
        return (math.ceil(math.prod(shape) / self.size),)

    def to_groups(self, x):
        return _pad_last(x.reshape(-1), self.size)

    def from_groups(self, g, shape):
        return g.reshape(-1)[: math.prod(shape)].reshape(shape)

    def columns_per_scale(self, shape):
        if shape[-1] % self.size:
            return super().columns_per_scale(shape)
        return self.size  # blocks of the flattened tensor never straddle rows: they are groups

    def per_row(self, shape):
        return shape[-1] % self.size == 0

    def __str__(self):
        return f"b{self.size}"


def _int(text, token):
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"granularity {token!r}: {text!r} is not an integer") from None


def parse_granularity(token: str) -> Granularity:
    """'tensor', 'channel', 'channel@1', 'token', 'g128', 'g32@-2', 'b64' -> a Granularity."""
    if token == "tensor":
        return PerTensor()
    if token == "token":
        return PerToken()
    if token == "channel":
        return PerChannel(0)
    if token.startswith("channel@"):
        return PerChannel(_int(token[len("channel@"):], token))
    if token[:1] in "gb" and token[1:].split("@")[0].lstrip("-").isdigit():
        size, _, axis = token[1:].partition("@")
        if token[0] == "g":
            return PerGroup(_int(size, token), _int(axis, token) if axis else -1)
        if axis:
            raise ValueError(f"blocks run over the flattened tensor and take no axis: {token!r}")
        return PerBlock(_int(size, token))
    raise ValueError(f"unknown granularity {token!r}; use tensor, channel, channel@AXIS, token, gN, gN@AXIS or bN")
