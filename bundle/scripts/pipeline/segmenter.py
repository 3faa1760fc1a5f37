"""The weakly supervised segmenter: classifier NAM -> scope -> ICM candidates -> R-NAM choice, as a MONAI inferer.

``WeaklySupervisedSegmenter(mode=...)(inputs, network)`` takes a batch of windowed slices ``(B, C, H, W)`` and
the 1-GAP (or any GAP) classifier, and returns named outputs, as MONAI's inferers do: the masks, the NAMs, the scope
and candidate maps, and each slice's record (probability, scopes, candidates with areas and R-NAM scores, choice).
``segment_batch`` gives the same as ``SliceResult`` objects, ``segment`` one slice's.
Modes (paper section 2.2):

- ``"coarse"``: the union of the candidates in the scope C.
- ``"fine"``: the candidate chosen by R-NAM.
- ``"multi_gap"``: the classifier gives the probability and C1; the NAM of ``multi_gap_network`` (a 2- or 3-GAP
  model) refines C to its most prominent blob inside C1 if it has one; R-NAM with the classifier within C1
  (the paper's "2-/3-GAP fine" rows).
- ``"multi_gap_coarse"``: the same scope C, and the union of its candidates (the "2-/3-GAP coarse" rows).
- ``"two_nodule"``: the two most prominent blobs, each screened by R-NAM.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from ..networks.gap_classifier import unwrap
from ..networks.runtime import PRECISIONS, inference_network
from .candidates import Candidate, extract_candidates, parenchyma_value
from .classify import logits_and_nam
from .context import centre_channel
from .icm import icm_segmentation
from .scope import bounding_box, refine_scope, top_scopes
from .screen import IncrementalNAM, rnam_scores, supports_incremental
from .settings import (
    GROUPS,
    HU_WINDOW,
    CandidateSettings,
    ICMSettings,
    ScopeSettings,
    ScreeningSettings,
    settings_group,
)

__all__ = [
    "MODES",
    "CONFIRM_MARGINS",
    "confirmation_line",
    "Classification",
    "SliceResult",
    "WeaklySupervisedSegmenter",
]

MODES = ("coarse", "fine", "multi_gap", "multi_gap_coarse", "two_nodule")
MULTI_GAP_MODES = ("multi_gap", "multi_gap_coarse")
COARSE_MODES = ("coarse", "multi_gap_coarse")
# Each reduced precision's confirm_margin (logits; *inferred*, docs/precision.md): int8 needs 2 for its probabilities
# below the line to stay within 0.02 of float32's on the real scans, bfloat16 is within 0.01 there and needs 1 only
# for its decisions.
CONFIRM_MARGINS = {"bfloat16": 1.0, "int8": 2.0}


def confirmation_line(threshold: float, margin: float) -> float:
    """The probability whose logit lies ``margin`` below ``threshold``'s: from it a reduced precision's slices are
    classified again in float32. A threshold of 0 gives 0 (every slice), 1 or more the most certain slices only."""
    threshold = min(max(float(threshold), 1e-12), 1.0 - 1e-12)
    return float(1.0 / (1.0 + np.exp(margin - np.log(threshold / (1.0 - threshold)))))


class Classification(NamedTuple):
    """What ``WeaklySupervisedSegmenter.classify`` gives for a batch of ``B`` slices ``(H, W)``.

    Attributes:
        probability: ``(B,)`` nodule probabilities.
        nam: ``(B, H, W)`` raw NAMs.
        multi_nam: ``(B, H, W)`` multi-GAP NAMs in the multi-GAP modes when a slice is called "nodule", else None.
        confirmed: ``(B,)`` bool, the slices classified again in float32 after a reduced precision (their
            probability and NAM are float32's).
        forwards: ``B`` entries, each the float32 forward of a slice called "nodule" with its layers kept, where
            R-NAM will screen from it on the CPU (``IncrementalNAM``: ``segment`` then runs no forward of the
            unmasked slice), else None.
    """

    probability: np.ndarray
    nam: np.ndarray
    multi_nam: np.ndarray | None
    confirmed: np.ndarray
    forwards: list[IncrementalNAM | None]


@dataclass
class SliceResult:
    """Everything the segmenter found on one slice.

    Args:
        probability: the classifier's nodule probability.
        positive: whether the slice was called "nodule" (and so segmented).
        status: ``"negative"``, ``"no_scope"`` (flat or non-finite NAM), ``"no_candidates"`` or ``"segmented"``.
        mask: ``(H, W)`` uint8 final mask.
        nam: ``(H, W)`` float32 raw NAM of the classifier.
        spacing: ``(row, col)`` pixel spacing in mm.
        scopes: the scope(s) C that candidates were taken from (bool masks).
        base_scope: C1 in multi_gap mode (where R-NAMs are compared), else None.
        refined: multi_gap mode: whether the multi-GAP NAM narrowed C1.
        candidates: all candidates, over all scopes.
        chosen: indices into ``candidates`` of the segmented ones.
        screen_seconds: time spent in R-NAM's classifier forwards (the rest of ``segment`` is scope, ICM, candidates).
        precision: the precision that gave ``probability`` and ``nam``.
    """

    probability: float
    positive: bool
    status: str
    mask: np.ndarray
    nam: np.ndarray
    spacing: tuple[float, float]
    scopes: list[np.ndarray] = field(default_factory=list)
    base_scope: np.ndarray | None = None
    refined: bool = False
    candidates: list[Candidate] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    screen_seconds: float = 0.0
    precision: str = "float32"

    def to_record(self) -> dict[str, Any]:
        """JSON-ready summary (boxes are ``[row_start, col_start, row_stop, col_stop]``, stops exclusive)."""

        def box(mask: np.ndarray | None) -> list[int] | None:
            found = None if mask is None else bounding_box(mask)
            return None if found is None else list(found)

        return {
            "probability": float(self.probability),
            "positive": bool(self.positive),
            "precision": self.precision,
            "status": self.status,
            "spacing_mm": [float(s) for s in self.spacing],
            "scope_boxes": [box(s) for s in self.scopes],
            "base_scope_box": box(self.base_scope),
            "scope_refined": bool(self.refined),
            "candidates": [c.to_record() for c in self.candidates],
            "chosen": [int(i) for i in self.chosen],
            "mask_area_mm2": float(self.mask.sum() * self.spacing[0] * self.spacing[1]),
        }


class WeaklySupervisedSegmenter(Inferer):
    """Segment nodules on CT slices from a GAP classifier's NAM (see the module docstring for the modes).

    Args:
        mode: ``"coarse"``, ``"fine"``, ``"multi_gap"``, ``"multi_gap_coarse"`` or ``"two_nodule"``.
        threshold: slices with a nodule probability below it get an empty mask.
        intensity_range: the HU window ``(a_min, a_max)`` that mapped HU to the network input [0, 1].
        lung_mask_fn: ``f(hu (H, W), spacing) -> bool (H, W)`` giving the lungs (e.g.
            ``scripts.pipeline.lungs.segment_lungs``); None: no lung restriction unless a ``lung_mask`` is passed.
        multi_gap_network: the 2- or 3-GAP model for the multi-GAP modes.
        scope, icm, candidates, screening: the settings of each step (``scripts.pipeline.settings``), as objects or as
            mappings of their fields (a config's sections); None: the group's defaults. ``PRESETS`` names other sets.
        spacing: ``(row, col)`` mm used when the inputs carry no affine and none is passed.
        amp: classify in mixed precision when the inputs are on CUDA (no effect on CPU).
        precision: the classifier's CPU path for the slices' and R-NAM's forwards: ``"float32"`` (the reference),
            ``"bfloat16"`` or ``"int8"`` (``scripts.networks.runtime``; float32 with a message where the CPU lacks the
            instructions). The multi-GAP classifier stays float32.
        checkpoint: the classifier's weights file, beside which int8 finds its quantised model.
        confirm_margin: after a reduced ``precision``, the slices whose nodule logit (log odds) lies at most this
            below the threshold's, or above it (``confirm_from``), are classified again in float32 and keep float32's
            probability and NAM: wherever the reduced precision moves a logit by less than the margin, every slice
            called "nodule" is decided, segmented and screened as in float32. One margin for every precision, or a
            mapping from precision to margin (``CONFIRM_MARGINS``, the default; docs/precision.md gives the figures
            behind it); None, for all or for one precision: the reduced precision's answer throughout.
    """

    def __init__(
        self,
        mode: str = "fine",
        threshold: float = 0.5,
        intensity_range: Sequence[float] = HU_WINDOW,
        lung_mask_fn: Callable[[np.ndarray, Sequence[float]], np.ndarray] | None = None,
        multi_gap_network: torch.nn.Module | None = None,
        scope: ScopeSettings | Mapping[str, Any] | None = None,
        icm: ICMSettings | Mapping[str, Any] | None = None,
        candidates: CandidateSettings | Mapping[str, Any] | None = None,
        screening: ScreeningSettings | Mapping[str, Any] | None = None,
        spacing: Sequence[float] = (1.0, 1.0),
        amp: bool = False,
        precision: str = "float32",
        checkpoint: str | None = None,
        confirm_margin: float | Mapping[str, float | None] | None = CONFIRM_MARGINS,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode in MULTI_GAP_MODES and multi_gap_network is None:
            raise ValueError(f"mode {mode!r} needs a multi_gap_network (the 2- or 3-GAP classifier)")
        if len(intensity_range) != 2 or intensity_range[1] <= intensity_range[0]:
            raise ValueError(f"intensity_range must be (a_min, a_max) with a_min < a_max, got {intensity_range}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        margins = confirm_margin if isinstance(confirm_margin, Mapping) else {p: confirm_margin for p in PRECISIONS}
        unknown = sorted(set(margins) - set(PRECISIONS))
        if unknown or any(m is not None and not m >= 0.0 for m in margins.values()):
            raise ValueError(
                f"confirm_margin must be >= 0 (logits) or None, or a mapping of precisions {PRECISIONS} to such, got "
                f"{confirm_margin}"
            )
        self.mode = mode
        self.threshold = float(threshold)
        self.intensity_range = (float(intensity_range[0]), float(intensity_range[1]))
        self.lung_mask_fn = lung_mask_fn
        self.multi_gap_network = multi_gap_network
        self.scope: ScopeSettings = settings_group("scope", scope)
        self.icm: ICMSettings = settings_group("icm", icm)
        self.candidates: CandidateSettings = settings_group("candidates", candidates)
        self.screening: ScreeningSettings = settings_group("screening", screening)
        self.spacing = (float(spacing[0]), float(spacing[1]))
        self.amp = bool(amp)
        self.precision = precision
        self.checkpoint = checkpoint
        self.confirm_margin = (
            {p: None if m is None else float(m) for p, m in confirm_margin.items()}
            if isinstance(confirm_margin, Mapping)
            else None if confirm_margin is None else float(confirm_margin)
        )
        self._runtime: tuple[Callable, Callable] | None = None  # (network, the network in ``precision``)

    def settings(self) -> dict[str, Any]:
        """What decides the masks, JSON-ready and named as the constructor's arguments (so that
        ``WeaklySupervisedSegmenter(**settings)`` segments alike): written beside the outputs, so that a mask can be
        traced to the rules that made it. The networks and the lung-mask function are left out."""
        return {
            "mode": self.mode,
            "threshold": self.threshold,
            "intensity_range": list(self.intensity_range),
            "precision": self.precision,
            "confirm_margin": self.confirm_margin,
            **{name: asdict(getattr(self, name)) for name in GROUPS},
        }

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Segment a batch of windowed slices ``inputs`` ``(B, C, H, W)``; return its named outputs.

        Returns:
            ``mask`` the masks, ``nam`` the raw NAMs, ``scope`` each scope's index per pixel (0 outside) and
            ``candidates`` candidate j labelled ``j + 1``, each ``(B, 1, H, W)`` float32 with the inputs' meta (so that
            ``Invertd`` takes them back to the input geometry); ``record`` each slice's ``SliceResult.to_record()`` as
            JSON text (``decollate_batch`` would split the lists of a record as if they were batched; text passes).

        Keyword args (optional): ``lung_mask`` ``(B, [1,] H, W)``; ``spacing`` ``(row, col)`` mm for all slices
        (else taken from the inputs' affine when they are a MetaTensor, else the constructor's ``spacing``).
        """
        results = self.segment_batch(inputs, network, kwargs.get("lung_mask"), kwargs.get("spacing"))
        maps = {"mask": [], "nam": [], "scope": [], "candidates": []}
        for result in results:
            scope_map = np.zeros(result.mask.shape, np.float32)
            for k, scope in enumerate(result.scopes):
                scope_map[scope & (scope_map == 0)] = k + 1
            candidate_map = np.zeros(result.mask.shape, np.float32)
            for j, candidate in enumerate(result.candidates):
                candidate_map[candidate.mask] = j + 1
            for key, array in zip(maps, (result.mask, result.nam, scope_map, candidate_map)):
                maps[key].append(array.astype(np.float32))
        outputs: dict[str, Any] = {}
        for key, arrays in maps.items():
            outputs[key] = torch.zeros_like(inputs[:, :1], dtype=torch.float32)  # keeps a MetaTensor's meta
            outputs[key].copy_(torch.as_tensor(np.stack(arrays)[:, None]))
        outputs["record"] = [json.dumps(result.to_record()) for result in results]
        return outputs

    def in_precision(self, network: Callable) -> Callable:
        """``network`` in the segmenter's ``precision``; made once per network (an int8 session takes a while)."""
        if self._runtime is None or self._runtime[0] is not network:
            self._runtime = (network, inference_network(network, self.precision, self.checkpoint))
        return self._runtime[1]

    @property
    def margin(self) -> float | None:
        """``confirm_margin`` for this segmenter's ``precision`` (None: no confirmation)."""
        if isinstance(self.confirm_margin, Mapping):
            return self.confirm_margin.get(self.precision)
        return self.confirm_margin

    @property
    def confirm_from(self) -> float | None:
        """The reduced precision's probability from which a slice is classified again in float32: the threshold's
        logit less the precision's ``margin``, as a probability (``confirmation_line``; None: never)."""
        return None if self.margin is None else confirmation_line(self.threshold, self.margin)

    def screening_network(self, network: Callable) -> Callable:
        """The network R-NAM screens with: the bfloat16 classifier (incremental) when the precision is bfloat16 and
        ``screening.reduced_precision`` is on, else float32 (exact, incremental; ``ScreeningSettings`` gives the
        figures behind the choice)."""
        if self.screening.reduced_precision and self.precision == "bfloat16":
            return self.in_precision(network)
        return network

    def classify(self, inputs: torch.Tensor, network: Callable) -> Classification:
        """Nodule probabilities, raw NAMs and, in the multi-GAP modes, the multi-GAP NAMs of a batch ``(B, C, H, W)``
        of windowed slices (``Classification``), in one forward of each network.

        With ``amp`` on CUDA the batch is classified in mixed precision; the NAMs of the slices called "nodule"
        are then recomputed in float32, so that R-NAM compares maps of one precision. After a reduced CPU
        ``precision`` the slices at ``confirm_from`` or above are classified again in float32. On the CPU the float32
        forwards run slice by slice (as fast as a batch there) and, where R-NAM screens from them
        (``keeps_forwards``), keep the layers of the slices called "nodule".
        """
        self._check_inputs(inputs)
        reference = unwrap(network)
        network = self.in_precision(reference)
        for name, model in (("classifier", network), ("multi-GAP classifier", self.multi_gap_network)):
            channels = getattr(model, "in_channels", inputs.shape[1])
            if channels != inputs.shape[1]:
                raise ValueError(
                    f"the {name} takes {channels} input channel(s), the slices have {inputs.shape[1]}: the 1-GAP "
                    "and the multi-GAP models must be trained on the same slices (single or 2.5-D)"
                )
        amp = self.amp and inputs.is_cuda
        keep = self.keeps_forwards(reference, inputs)
        confirmed = np.zeros(inputs.shape[0], bool)
        forwards: list[IncrementalNAM | None] = [None] * inputs.shape[0]
        with torch.no_grad():
            if network is reference and not inputs.is_cuda:
                logits, nams, forwards = self._float32_forwards(reference, inputs, keep)
            else:
                with torch.autocast("cuda", enabled=amp):
                    logits, nams = logits_and_nam(network, inputs)
            nams = nams.float()
            probs = torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
            if network is not reference and self.confirm_from is not None:
                confirmed = probs >= self.confirm_from
                if confirmed.any():
                    chosen = torch.as_tensor(confirmed, device=inputs.device)
                    float32_logits, float32_nams, kept = self._float32_forwards(reference, inputs[chosen], keep)
                    probs[confirmed] = torch.softmax(float32_logits, dim=1)[:, 1].cpu().numpy()
                    nams[chosen] = float32_nams
                    for index, forward in zip(np.flatnonzero(confirmed), kept):
                        forwards[index] = forward
            positive = probs >= self.threshold
            if amp and positive.any():
                chosen = torch.as_tensor(positive, device=inputs.device)
                nams[chosen] = logits_and_nam(network, inputs[chosen])[1].float()
            multi_nams = None
            if self.mode in MULTI_GAP_MODES and positive.any():
                multi_nams = logits_and_nam(self.multi_gap_network, inputs)[1][:, 0].float().cpu().numpy()
        return Classification(probs, nams[:, 0].cpu().numpy(), multi_nams, confirmed, forwards)

    def keeps_forwards(self, network: Callable, inputs: torch.Tensor) -> bool:
        """Whether ``classify`` keeps the float32 forwards of the slices called "nodule" for R-NAM: in the modes that
        screen, on the CPU, where R-NAM screens incrementally with the float32 ``network`` (saving it one forward of
        each segmented slice's crop)."""
        return (
            self.mode not in COARSE_MODES
            and self.screening.crop
            and not inputs.is_cuda
            and self.screening_network(network) is network
            and supports_incremental(network)
        )

    def _float32_forwards(
        self, network: Callable, inputs: torch.Tensor, keep: bool
    ) -> tuple[torch.Tensor, torch.Tensor, list[IncrementalNAM | None]]:
        """Logits ``(B, 2)`` and NAMs ``(B, 1, H, W)`` of ``inputs`` through the float32 ``network`` on the CPU, slice
        by slice (as fast as a batch there, and every mode gets the same numbers), with ``keep`` through
        ``IncrementalNAM`` (the same forward), keeping it for each slice at the threshold or above."""
        logits, nams, kept = [], [], []
        for image in inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs:
            forward = IncrementalNAM(network, image) if keep else None
            logit, nam = (forward.logits(), forward.nam()) if keep else logits_and_nam(network, image[None])
            logits.append(logit)
            nams.append(nam)
            positive = float(torch.softmax(logit.float(), dim=1)[0, 1]) >= self.threshold
            kept.append(forward if positive else None)
        return torch.cat(logits), torch.cat(nams), kept

    def segment_batch(
        self,
        inputs: torch.Tensor,
        network: Callable,
        lung_mask: torch.Tensor | np.ndarray | None = None,
        spacing: Sequence[float] | None = None,
    ) -> list[SliceResult]:
        """Classify a batch ``(B, C, H, W)`` of windowed slices (``classify``) and segment those called "nodule"."""
        probs, nams, multi_nams, confirmed, forwards = self.classify(inputs, unwrap(network))
        results = []
        for b in range(inputs.shape[0]):
            lungs = None if lung_mask is None else np.asarray(torch.as_tensor(lung_mask[b]).cpu()).astype(bool)
            lungs = lungs.reshape(inputs.shape[2:]) if lungs is not None else None
            results.append(
                self.segment(
                    inputs[b].as_tensor() if isinstance(inputs, MetaTensor) else inputs[b],
                    unwrap(network),
                    float(probs[b]),
                    nams[b],
                    self._spacing(inputs, b, spacing),
                    lung_mask=lungs,
                    multi_nam=None if multi_nams is None else multi_nams[b],
                    precision=self.classified_in(bool(confirmed[b])),
                    forward=forwards[b],
                )
            )
            forwards[b] = None  # the kept layers go as soon as the slice is segmented
        return results

    def segment(
        self,
        image: torch.Tensor,
        network: Callable,
        probability: float,
        nam: np.ndarray,
        spacing: Sequence[float],
        lung_mask: np.ndarray | None = None,
        multi_nam: np.ndarray | None = None,
        precision: str | None = None,
        forward: IncrementalNAM | None = None,
    ) -> SliceResult:
        """Segment one slice ``image`` ``(C, H, W)`` given the classifier's probability and raw NAM, which came from
        the classifier in ``precision`` (None: the segmenter's, as ``classify`` ran it without confirmation), and, if
        ``classify`` kept it, the slice's float32 forward (R-NAM starts from it)."""
        spacing = (float(spacing[0]), float(spacing[1]))
        shape = tuple(image.shape[1:])
        empty = np.zeros(shape, np.uint8)
        result = SliceResult(
            probability, probability >= self.threshold, "negative", empty, nam.astype(np.float32), spacing
        )
        result.precision = self.classified_in(False) if precision is None else precision
        if not result.positive:
            return result
        watershed = {
            "sigma": self.scope.sigma,
            "threshold": self.scope.threshold,
            "min_distance": self.scope.min_distance,
        }
        scopes = top_scopes(nam, self.scope.n_nodules if self.mode == "two_nodule" else 1, **watershed)
        if not scopes:
            result.status = "no_scope"
            return result
        if self.mode in MULTI_GAP_MODES:
            result.base_scope = scopes[0]
            scope, result.refined = refine_scope(
                multi_nam, scopes[0], min_peak=self.scope.multi_gap_min_peak, **watershed
            )
            scopes = [scope]
        result.scopes = scopes

        lo, hi = self.intensity_range
        hu = lo + image[centre_channel(image.shape[0])].float().cpu().numpy().astype(np.float64) * (hi - lo)
        if lung_mask is None and self.lung_mask_fn is not None:
            lung_mask = np.asarray(self.lung_mask_fn(hu, spacing), bool)
        if lung_mask is not None and lung_mask.shape != shape:
            raise ValueError(f"lung mask shape {lung_mask.shape} differs from the slice shape {shape}")
        labels, means = icm_segmentation(hu, lung_mask, **asdict(self.icm))
        rules = self.candidates.extract_arguments(self.icm)
        for scope in scopes:
            found = extract_candidates(labels, means, scope, lung_mask, spacing, hu=hu, **rules)
            if not found:
                continue
            first = len(result.candidates)
            result.candidates += found
            if self.mode in COARSE_MODES:
                result.chosen += list(range(first, first + len(found)))
                continue
            region = result.base_scope if self.mode in MULTI_GAP_MODES else scope
            fill = (parenchyma_value(labels, means, lung_mask, self.candidates.dense_hu) - lo) / (hi - lo)
            clock = time.perf_counter()
            screener = self.screening_network(network)
            same_precision = (screener is network) == (result.precision == "float32")
            scores = rnam_scores(
                screener,
                image,
                nam if same_precision else None,  # a NAM of another precision is no reference
                region,
                np.stack([c.mask for c in found]),
                float(np.clip(fill, 0.0, 1.0)),
                crop=self.screening.crop,
                batch_size=self.screening.batch_size,
                base=forward if screener is network else None,
            )
            result.screen_seconds += time.perf_counter() - clock
            for candidate, score in zip(found, scores):
                candidate.score = float(score)
            result.chosen.append(first + int(np.argmax(scores)))
        if not result.chosen:
            result.status = "no_candidates"
            return result
        result.status = "segmented"
        result.mask = np.any([result.candidates[i].mask for i in result.chosen], axis=0).astype(np.uint8)
        return result

    def classified_in(self, confirmed: bool) -> str:
        """The precision that gave a slice's probability and NAM (float32 where a CPU without the instructions ran
        it)."""
        if confirmed or self._runtime is None or self._runtime[1] is self._runtime[0]:
            return "float32"
        return self.precision

    def _check_inputs(self, inputs: torch.Tensor) -> None:
        name = ""
        if isinstance(inputs, MetaTensor):
            name = f" ({inputs.meta.get('filename_or_obj', '')})" if "filename_or_obj" in inputs.meta else ""
        if not isinstance(inputs, torch.Tensor) or inputs.ndim != 4:
            shape = tuple(getattr(inputs, "shape", ()))
            raise ValueError(f"expected a batch of 2-D slices (B, C, H, W), got shape {shape}{name}")
        if not torch.isfinite(inputs).all():
            raise ValueError(f"the input slices hold NaN or infinite values{name}")

    def _spacing(self, inputs: torch.Tensor, index: int, spacing: Sequence[float] | None) -> tuple[float, float]:
        if spacing is not None:
            return float(spacing[0]), float(spacing[1])
        if isinstance(inputs, MetaTensor) and "affine" in inputs.meta:
            affine = inputs.affine
            affine = affine[index] if affine.ndim == 3 else affine
            norms = torch.linalg.norm(affine[:-1, :2].double(), dim=0)
            return float(norms[0]), float(norms[1])
        return self.spacing
