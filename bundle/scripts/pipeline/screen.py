"""Residual NAM (R-NAM) screening of nodule candidates (the paper's Eq. 4).

Each candidate R_j is filled in the image, all filled copies go through the network in one batch, and
``score_j = sum_{(x, y) in C} (NAM_I - NAM_{I \\ R_j})^2``; the candidate whose removal changes the NAM
in the scope C the most is the nodule.

Two exact shortcuts, both on by default:

- Cropping: the NAM inside C depends only on the input pixels within the network's context radius of C.
  A crop whose origin is a multiple of the network's stride (so pooling grids and the bilinear upsampling
  grid coincide with the full image's) and which reaches ``nam_context_radius`` beyond C on every side
  gives the same NAM in C as the full image, at the cost of a smaller forward.
- Incremental recomputation (``GAPClassifier`` only): a filled copy differs from the image only inside
  R_j, so a layer's activations differ only inside R_j's box grown by the layers' reach (1 px per 3x3
  convolution, halved by each pooling). The unmasked image runs once with every layer's input kept
  (``IncrementalNAM``; the segmenter keeps the one that classified the slice, and the crop is then not
  needed); the copies then recompute, layer by layer, only that window (one window for a group of nearby
  candidates: their union), reading its surroundings from the kept inputs. The NAM is linear in the head
  activations, so the NAM change is the upsampled change of the head NAMs, each non-zero only in its head's window.

The bfloat16 classifier (``scripts.networks.runtime.BFloat16Classifier``) takes the incremental path too, with its
own split: the layers before its ``float32_prefix`` in float32, the rest and the heads' convolutions in bfloat16
autocast, the NAM change summed in float32.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..networks.gap_classifier import GAPClassifier
from .classify import logits_and_nam

__all__ = ["fill_candidates", "crop_window", "supports_incremental", "IncrementalNAM", "rnam_scores"]


def fill_candidates(image: torch.Tensor, masks: np.ndarray, fill_value: float) -> torch.Tensor:
    """``(N, C, H, W)`` copies of a ``(C, H, W)`` image, copy j with candidate j set to ``fill_value``."""
    masks_t = torch.as_tensor(np.asarray(masks, bool), device=image.device)[:, None]
    return torch.where(masks_t, torch.as_tensor(fill_value, dtype=image.dtype, device=image.device), image[None])


def crop_window(
    box: tuple[int, int, int, int], shape: tuple[int, int], stride: int, radius: int
) -> tuple[slice, slice] | None:
    """The stride-aligned crop that gives the exact NAM inside ``box``, or None when only the full image will do.

    Args:
        box: ``(row_start, col_start, row_stop, col_stop)`` of the region where the NAM is needed.
        shape: ``(H, W)`` of the image.
        stride: the network's total stride (crop origins and sizes are multiples of it).
        radius: input pixels on each side of a NAM pixel that can influence it.

    Returns:
        ``(rows, cols)`` slices, or None when the image size is not a multiple of the stride (the
        upsampling grid would differ) or the crop would not be smaller than the image.
    """
    if stride < 1 or radius < 0:
        raise ValueError(f"need stride >= 1 and radius >= 0, got {stride}, {radius}")
    if any(n % stride for n in shape):
        return None
    window = []
    for start, stop, n in ((box[0], box[2], shape[0]), (box[1], box[3], shape[1])):
        lo = max(0, (start - radius) // stride * stride)
        hi = min(n, math.ceil((stop + radius) / stride) * stride)
        window.append(slice(lo, hi))
    if (window[0].stop - window[0].start) * (window[1].stop - window[1].start) >= shape[0] * shape[1]:
        return None
    return window[0], window[1]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _geometry(layer: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None:
    """``(kernel, stride, padding)`` per axis of a windowed layer; None for an elementwise one (ReLU, eval-mode BN)."""
    if isinstance(layer, (nn.ReLU, nn.BatchNorm2d)):
        return None
    return tuple(_pair(getattr(layer, name)) for name in ("kernel_size", "stride", "padding"))


def supports_incremental(network: Callable) -> bool:
    """Whether ``network`` is a ``GAPClassifier`` built only of layers the incremental path reproduces exactly.

    Those are ReLUs, batch normalisation in eval mode (a per-channel affine map), zero-padded undilated
    convolutions and unpadded undilated max pooling without ceil mode; anything else (e.g. reflection padding, or
    batch statistics in training mode) changes which pixels a layer reads, so it takes the general path.
    """
    if not isinstance(network, GAPClassifier):
        return False
    layers = [*network.features[: max(network.tap_indices) + 1], *(layer for head in network.heads for layer in head)]
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            ok = layer.padding_mode == "zeros" and not isinstance(layer.padding, str) and layer.dilation == (1, 1)
        elif isinstance(layer, nn.MaxPool2d):
            ok = _pair(layer.padding) == (0, 0) and _pair(layer.dilation) == (1, 1) and not layer.ceil_mode
        elif isinstance(layer, nn.BatchNorm2d):
            ok = not layer.training
        else:
            ok = isinstance(layer, nn.ReLU)
        if not ok:
            return False
    return True


class _Changed(NamedTuple):
    """The masked copies' activations ``values`` ``(N, C, h, w)`` in the window at ``(top, left)`` where they
    may differ from the unmasked image's (outside it they are equal)."""

    top: int
    left: int
    values: torch.Tensor


def _reach(start: int, stop: int, size: int, kernel: int, stride: int, padding: int) -> tuple[int, int, int, int]:
    """Along one axis: the outputs ``[o0, o1)`` that inputs ``[start, stop)`` influence, and the padded-input
    span ``[i0, i1)`` that those outputs read."""
    outputs = (size + 2 * padding - kernel) // stride + 1
    o0 = max(0, math.ceil((start + padding - kernel + 1) / stride))
    o1 = min(outputs, math.ceil((stop + padding) / stride))
    return o0, o1, stride * o0, stride * (o1 - 1) + kernel


class _Autocast(NamedTuple):
    """Layers from index ``start`` on run in CPU autocast to ``dtype``; the ones before in float32."""

    dtype: torch.dtype
    start: int = 0


def _precision(index: int, autocast: _Autocast | None) -> contextlib.AbstractContextManager:
    """The context layer ``index`` runs in: autocast from ``autocast.start`` on, else float32."""
    if autocast is None or index < autocast.start:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=autocast.dtype)


def _cache_inputs(
    layers: Sequence[nn.Module], x: torch.Tensor, keep: Sequence[int] = (), autocast: _Autocast | None = None
) -> tuple[list[torch.Tensor | None], torch.Tensor, dict[int, torch.Tensor]]:
    """Run the unmasked ``x`` through ``layers``: each windowed layer's input (None for an elementwise one), the
    output, and the outputs of the layers indexed in ``keep``. The inputs are the forward's own tensors, not copies:
    no layer here changes its input in place (an in-place ReLU changes the convolution's output, which is cached
    only as the next layer's input, after the ReLU)."""
    inputs: list[torch.Tensor | None] = []
    kept = {}
    for index, layer in enumerate(layers):
        inputs.append(None if _geometry(layer) is None else x)
        with _precision(index, autocast):
            x = layer(x)
        if index in keep:
            kept[index] = x
    return inputs, x, kept


def _padded_window(cached: torch.Tensor, padding: tuple[int, int], rows: slice, cols: slice, n: int) -> torch.Tensor:
    """``n`` copies of the window ``rows, cols`` (coordinates of ``cached`` zero-padded by ``padding``) of
    ``cached`` ``(1, C, h, w)``: what a zero-padding layer reads there."""
    patch = cached.new_zeros((n, cached.shape[1], rows.stop - rows.start, cols.stop - cols.start))
    r0, r1 = max(rows.start - padding[0], 0), min(rows.stop - padding[0], cached.shape[2])
    c0, c1 = max(cols.start - padding[1], 0), min(cols.stop - padding[1], cached.shape[3])
    top, left = r0 + padding[0] - rows.start, c0 + padding[1] - cols.start
    patch[:, :, top : top + r1 - r0, left : left + c1 - c0] = cached[:, :, r0:r1, c0:c1]
    return patch


def _spans(
    geometry: tuple[tuple[int, int], ...], cached: torch.Tensor, spans: Sequence[tuple[int, int]]
) -> list[tuple[int, int, int, int]] | None:
    """Per axis, ``_reach`` of a windowed layer of ``geometry`` (kernel, stride, padding) whose input ``cached``
    changes in ``spans`` (``[start, stop)`` per axis); None when the change reaches no output (e.g. only the odd last
    row, which pooling drops, changed)."""
    kernel, stride, padding = geometry
    out = [
        _reach(start, stop, cached.shape[2 + axis], kernel[axis], stride[axis], padding[axis])
        for axis, (start, stop) in enumerate(spans)
    ]
    return None if any(o1 <= o0 for o0, o1, _, _ in out) else out


def _advance(layer: nn.Module, cached: torch.Tensor | None, changed: _Changed) -> _Changed | None:
    """Apply ``layer`` to the masked copies inside the window only (None: the change does not reach its output)."""
    if cached is None:  # elementwise: the window stays
        return _Changed(changed.top, changed.left, layer(changed.values))
    geometry = _geometry(layer)
    padding = geometry[2]
    height, width = changed.values.shape[2:]
    spans = _spans(geometry, cached, [(changed.top, changed.top + height), (changed.left, changed.left + width)])
    if spans is None:
        return None
    (o0, o1, i0, i1), (q0, q1, j0, j1) = spans
    # the inputs the window's outputs read: the cache, with the changed window pasted over it (the window may
    # stick out of the read span on the far side when pooling drops an odd last row or column)
    patch = _padded_window(cached, padding, slice(i0, i1), slice(j0, j1), len(changed.values))
    top, left = changed.top + padding[0], changed.left + padding[1]
    r0, r1 = max(top, i0), min(top + changed.values.shape[2], i1)
    c0, c1 = max(left, j0), min(left + changed.values.shape[3], j1)
    patch[:, :, r0 - i0 : r1 - i0, c0 - j0 : c1 - j0] = changed.values[:, :, r0 - top : r1 - top, c0 - left : c1 - left]
    if isinstance(layer, nn.Conv2d):
        out = F.conv2d(patch, layer.weight, layer.bias, layer.stride, 0, 1, layer.groups)
    else:
        out = F.max_pool2d(patch, layer.kernel_size, layer.stride)
    return _Changed(o0, q0, out)


def _advance_all(
    layers: Sequence[nn.Module],
    inputs: Sequence[torch.Tensor | None],
    changed: _Changed,
    keep: Sequence[int] = (),
    autocast: _Autocast | None = None,
) -> tuple[_Changed | None, dict[int, _Changed]]:
    """``_advance`` through ``layers``; also the windows after the layers indexed in ``keep`` that were reached."""
    kept = {}
    for index, (layer, cached) in enumerate(zip(layers, inputs)):
        with _precision(index, autocast):
            changed = _advance(layer, cached, changed)
        if changed is None:
            break
        if index in keep:
            kept[index] = changed
    return changed, kept


def _window_after(
    layer: nn.Module, cached: torch.Tensor | None, spans: list[tuple[int, int]]
) -> tuple[list[tuple[int, int]] | None, float]:
    """The output window ``[(o0, o1), (q0, q1)]`` of ``layer`` that a change in ``spans`` reaches, and the
    multiply-adds of recomputing it for one copy (None, 0 when the change does not reach the output)."""
    if cached is None:  # elementwise: the window stays; its cost is small beside a convolution's
        return spans, 0.0
    geometry = _geometry(layer)
    reached = _spans(geometry, cached, spans)
    if reached is None:
        return None, 0.0
    out = [(o0, o1) for o0, o1, _, _ in reached]
    kernel = geometry[0]
    per_pixel = layer.weight.numel() if isinstance(layer, nn.Conv2d) else cached.shape[1] * kernel[0] * kernel[1]
    return out, float((out[0][1] - out[0][0]) * (out[1][1] - out[1][0]) * per_pixel)


class IncrementalNAM:
    """One image's forward, every layer's input kept, from which the NAM change of masked copies of the image is
    recomputed only in the windows the masks change.

    Args:
        network: a GAPClassifier for which ``supports_incremental`` holds.
        image: ``(C, H, W)`` unmasked input; it runs through the network once.
        autocast: None (float32), or the backbone layers from ``autocast.start`` on and the heads' convolutions in
            ``autocast.dtype``; the NAM change is summed in float32 either way.

    The forward is the network's own (the same layers in the same order), so ``logits()`` and ``nam()`` are what
    ``forward_with_nam`` gives for the image: the segmenter classifies a slice this way when R-NAM will need it.
    """

    def __init__(self, network: GAPClassifier, image: torch.Tensor, autocast: _Autocast | None = None) -> None:
        self.network = network
        self.size = tuple(image.shape[1:])
        self.taps = network.tap_indices
        self.layers = list(network.features[: max(self.taps) + 1])
        self.autocast = autocast
        self.head_autocast = None if autocast is None else autocast._replace(start=0)
        self.inputs, _, taps = _cache_inputs(self.layers, network.normalize_input(image[None]), self.taps, autocast)
        self.heads = []  # per head: (layers, cached inputs, unmasked activations, NAM weights), in head order
        for head, tap, weight in zip(network.heads, self.taps, torch.split(network.nam_weights(), network.head_sizes)):
            inputs, activations, _ = _cache_inputs(list(head), taps[tap], autocast=self.head_autocast)
            # bfloat16 activations are compared and summed in float32
            self.heads.append((list(head), inputs, activations.to(weight.dtype), weight))

    def logits(self) -> torch.Tensor:
        """The image's logits ``(1, 2)``."""
        return self.network.logits_of([base for _, _, base, _ in self.heads])

    def nam(self) -> torch.Tensor:
        """The image's raw NAM ``(1, 1, H, W)``."""
        return self.network.nam_of([base for _, _, base, _ in self.heads], list(self.size))

    def window_cost(self, rows: tuple[int, int], cols: tuple[int, int]) -> float:
        """Multiply-adds of recomputing one masked copy whose change lies in input rows ``[rows)`` and columns
        ``[cols)``: the windows ``__call__`` recomputes, layer by layer."""
        spans, total, at_taps = [rows, cols], 0.0, {}
        for index, (layer, cached) in enumerate(zip(self.layers, self.inputs)):
            spans, macs = _window_after(layer, cached, spans)
            if spans is None:
                break
            total += macs
            if index in self.taps:
                at_taps[index] = spans
        for tap, (layers, inputs, _, _) in zip(self.taps, self.heads):
            spans = at_taps.get(tap)
            for layer, cached in zip(layers, inputs):
                if spans is None:
                    break
                spans, macs = _window_after(layer, cached, spans)
                total += macs
        return total

    def __call__(self, changed: _Changed) -> torch.Tensor:
        """``(N, H, W)`` float64 change of the NAM, ``NAM_{I \\ R_j} - NAM_I``, given the changed input window."""
        delta = torch.zeros((len(changed.values), *self.size), dtype=torch.float64, device=changed.values.device)
        changed = changed._replace(values=self.network.normalize_input(changed.values))
        _, at_taps = _advance_all(self.layers, self.inputs, changed, self.taps, self.autocast)
        for tap, (layers, inputs, base, weight) in zip(self.taps, self.heads):
            head = (
                _advance_all(layers, inputs, at_taps[tap], autocast=self.head_autocast)[0] if tap in at_taps else None
            )
            if head is None:
                continue
            rows = slice(head.top, head.top + head.values.shape[2])
            cols = slice(head.left, head.left + head.values.shape[3])
            change = head.values.to(base.dtype) - base[:, :, rows, cols]
            # the NAM is linear in the head activations: upsample the change of the head NAM, zero off the window
            head_delta = base.new_zeros((len(head.values), 1, *base.shape[2:]))
            head_delta[:, 0, rows, cols] = torch.einsum("nkhw,k->nhw", change, weight)
            delta += F.interpolate(head_delta, size=self.size, mode="bilinear", align_corners=False)[:, 0]
        return delta


def _incremental(network: Callable) -> tuple[GAPClassifier, _Autocast | None] | None:
    """The float32 classifier the incremental path recomputes and the autocast it runs in, for a ``GAPClassifier``
    (float32) or a reduced classifier that names its autocast (``autocast_dtype`` and ``float32_prefix``); None
    for anything else (the int8 model: cropped forwards)."""
    if supports_incremental(network):
        return network, None
    inner, dtype = getattr(network, "network", None), getattr(network, "autocast_dtype", None)
    if dtype is not None and supports_incremental(inner):
        return inner, _Autocast(dtype, network.float32_prefix)
    return None


@torch.no_grad()
def rnam_scores(
    network: Callable,
    image: torch.Tensor,
    nam: np.ndarray | None,
    scope: np.ndarray,
    masks: np.ndarray,
    fill_value: float,
    crop: bool = True,
    batch_size: int | None = None,
    incremental: bool = True,
    base: IncrementalNAM | None = None,
) -> np.ndarray:
    """R-NAM score of each candidate.

    Args:
        network: the classifier that gave ``nam`` (offers ``forward_with_nam`` or ``nam``); its attributes
            ``nam_stride`` and ``nam_context_radius`` enable the exact crop.
        image: ``(C, H, W)`` network input of the slice.
        nam: ``(H, W)`` raw NAM of the unmasked image: the reference of the full-forward paths (the
            incremental path computes the NAM change directly); None: computed here by ``network`` (when the
            NAM at hand came from a network of another precision).
        scope: ``(H, W)`` bool region C where NAMs are compared.
        masks: ``(N, H, W)`` bool candidate masks.
        fill_value: value (in network input units) written into a candidate.
        crop: use the exact shortcuts (see the module docstring); False: full forwards of the full image,
            the reference path.
        batch_size: copies per forward, or per window on the incremental path (None: all in one batch, or on the
            incremental path nearby candidates together and distant ones apart, ``_groups``).
        incremental: with ``crop``, recompute only what each candidate changes when ``supports_incremental``
            (False: full forwards of the crop).
        base: the image's forward through ``network`` with its layers kept (``IncrementalNAM(network, image)``,
            as the segmenter keeps it from classifying the slice): the scores are recomputed from it on the whole
            image, with no forward here (``crop`` and ``incremental`` are for the paths that start with one).

    Returns:
        ``(N,)`` float64 scores (empty for no candidates).
    """
    masks = np.asarray(masks, bool)
    scope = np.asarray(scope, bool)
    if image.ndim != 3 or masks.ndim != 3 or masks.shape[1:] != image.shape[1:] or scope.shape != image.shape[1:]:
        raise ValueError(
            f"need image (C, H, W), masks (N, H, W) and scope (H, W) of one size; got {tuple(image.shape)}, "
            f"{masks.shape}, {scope.shape}"
        )
    if base is not None and base.size != tuple(image.shape[1:]):
        raise ValueError(f"the kept forward is of a {base.size} image, the image is {tuple(image.shape[1:])}")
    if masks.shape[0] == 0 or not scope.any():
        return np.zeros(masks.shape[0])
    if base is not None:
        return _incremental_scores(base, image, scope, masks, fill_value, batch_size)
    rows, cols = slice(None), slice(None)
    stride, radius = getattr(network, "nam_stride", None), getattr(network, "nam_context_radius", None)
    if crop and stride is not None and radius is not None:
        r, c = np.nonzero(scope)
        window = crop_window((r.min(), c.min(), r.max() + 1, c.max() + 1), image.shape[1:], int(stride), int(radius))
        if window is not None:
            rows, cols = window
    sub_image, sub_masks = image[:, rows, cols], masks[:, rows, cols]
    path = _incremental(network) if crop and incremental else None
    if path is not None:
        return _incremental_scores(
            IncrementalNAM(path[0], sub_image, path[1]), sub_image, scope[rows, cols], sub_masks, fill_value, batch_size
        )
    sub_scope = torch.as_tensor(scope[rows, cols], device=image.device)
    step = batch_size or masks.shape[0]
    scores = []
    if nam is None:  # the crop's NAM equals the full image's inside the scope (the exact crop)
        reference = logits_and_nam(network, sub_image[None])[1][0, 0].double()
    else:
        reference = torch.as_tensor(np.asarray(nam)[rows, cols], dtype=torch.float64, device=image.device)
    for i in range(0, masks.shape[0], step):
        _, rnam = logits_and_nam(network, fill_candidates(sub_image, sub_masks[i : i + step], fill_value))
        diff = (reference[None] - rnam[:, 0].double()) * sub_scope[None]
        scores.append((diff**2).sum(dim=(1, 2)).cpu().numpy())
    return np.concatenate(scores)


def _incremental_scores(
    nam_change: IncrementalNAM,
    image: torch.Tensor,
    scope: np.ndarray,
    masks: np.ndarray,
    fill_value: float,
    batch_size: int | None,
) -> np.ndarray:
    """The scores of ``masks`` ``(N, H, W)`` on ``image`` ``(C, H, W)``, whose forward ``nam_change`` kept."""
    scope_t = torch.as_tensor(scope, device=image.device)
    scores = np.zeros(masks.shape[0])  # a candidate without pixels changes nothing
    for group, (r0, r1, c0, c1) in _groups(nam_change, masks, batch_size):
        filled = fill_candidates(image[:, r0:r1, c0:c1], masks[group, r0:r1, c0:c1], fill_value)
        diff = nam_change(_Changed(r0, c0, filled)) * scope_t[None]
        scores[group] = (diff**2).sum(dim=(1, 2)).cpu().numpy()
    return scores


# what recomputing a group of copies in one window costs besides its multiply-adds (a pass of Python over the layers),
# in multiply-adds; *inferred* from real slices at widths 0.125 and 1 (docs/benchmarks.md)
GROUP_OVERHEAD_MACS = 2e8

Box = tuple[int, int, int, int]  # rows [r0, r1) and columns [c0, c1)


def _union(a: Box, b: Box) -> Box:
    return min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])


def _groups(nam_change: IncrementalNAM, masks: np.ndarray, batch_size: int | None) -> list[tuple[np.ndarray, Box]]:
    """The candidates recomputed together and the window each group is recomputed in (the union of its candidates'
    boxes), candidates without pixels left out: ``batch_size`` at a time in turn, or (None) each candidate in turn
    joins the last group when the group's copies and its own cost less in the grown window than apart
    (``IncrementalNAM.window_cost``, plus ``GROUP_OVERHEAD_MACS`` a group): candidates close together share a window,
    those far apart do not pay for the space between them."""
    rows_on, cols_on = masks.any(axis=2), masks.any(axis=1)  # (N, H), (N, W)
    present = np.flatnonzero(rows_on.any(axis=1))
    boxes = {
        j: (
            int(rows_on[j].argmax()),
            rows_on.shape[1] - int(rows_on[j, ::-1].argmax()),
            int(cols_on[j].argmax()),
            cols_on.shape[1] - int(cols_on[j, ::-1].argmax()),
        )
        for j in present
    }
    if batch_size:
        chunks = [present[i : i + batch_size] for i in range(0, present.size, batch_size)]
        return [(chunk, functools.reduce(_union, (boxes[j] for j in chunk))) for chunk in chunks]
    groups: list[tuple[list[int], Box, float]] = []  # members, their union box, its window's cost
    for j in present:
        box = boxes[j]
        own = nam_change.window_cost(box[:2], box[2:])
        if groups:
            members, union, cost = groups[-1]
            merged = _union(union, box)
            merged_cost = nam_change.window_cost(merged[:2], merged[2:])
            if (len(members) + 1) * merged_cost <= len(members) * cost + own + GROUP_OVERHEAD_MACS:
                groups[-1] = (members + [j], merged, merged_cost)
                continue
        groups.append(([j], box, own))
    return [(np.asarray(members), union) for members, union, _ in groups]
