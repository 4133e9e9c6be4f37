"""Per-patch H&E intensity normalisation (``TissueNet(stain_norm=True)``).

Staining strength differs between laboratories, slides and patients: the same benign gland can
be pale in one slide and dark in the next, and a classifier that reads optical density (OD)
learns "dark = malignant" from a few patients. This step makes a patch's haematoxylin and eosin
intensities comparable before any feature is computed:

1. Ruifrok colour deconvolution of the patch's OD into H, E and residual concentrations;
2. the 99th percentile of H and of E over the patch's tissue pixels (mean OD above
   :data:`TISSUE_OD`; all pixels when fewer than 5 % are tissue);
3. H and E are scaled so that those percentiles equal the model's stored reference (fitted on
   its training crops, without labels), the gains clamped to :data:`GAIN_RANGE`; the residual
   channel is kept; the result is converted back to RGB.

Stain *vectors* are not re-estimated (no Macenko step): the fixed Ruifrok vectors are what the
model's features use anyway. On GlaS (13 patients, benign vs malignant) this changed
leave-one-patient-out accuracy from 0.888 to 0.974 (mean of four training seeds; model card
``colon-glas``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["GAIN_RANGE", "PERCENTILE", "TISSUE_OD", "he_percentiles", "normalise_he"]

#: Percentile (as a fraction) of the H and E concentrations that is matched to the reference.
PERCENTILE = 0.99
#: Mean optical density above which a pixel counts as tissue.
TISSUE_OD = 0.15
#: Below this share of tissue pixels the percentiles are taken over the whole patch.
MIN_TISSUE_FRACTION = 0.05
#: Smallest and largest gain applied to the H or E concentration.
GAIN_RANGE = (0.25, 4.0)


def _masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q`` quantile (nearest rank) of ``values`` ``(N, P)`` over ``mask`` ``(N, P)``.

    Rows whose mask holds fewer than :data:`MIN_TISSUE_FRACTION` of the pixels use all of them.
    """
    sparse = mask.sum(dim=1) < MIN_TISSUE_FRACTION * values.shape[1]
    mask = mask | sparse.unsqueeze(1)
    count = mask.sum(dim=1)
    ranked = torch.where(mask, values, torch.full_like(values, -torch.inf))
    ranked = ranked.sort(dim=1, descending=True).values
    k = ((1.0 - q) * (count - 1).float()).round().long().clamp_min(0)
    return ranked.gather(1, k.unsqueeze(1)).squeeze(1)


def _od_and_hed(rgb: torch.Tensor, hed_from_rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    od = -torch.log((rgb.float() * 255.0 + 1.0) / 256.0)
    hed = F.conv2d(od, hed_from_rgb.T[:, :, None, None])
    return od, hed


def he_percentiles(rgb: torch.Tensor, hed_from_rgb: torch.Tensor) -> torch.Tensor:
    """The :data:`PERCENTILE` of H and E concentration over tissue pixels, ``(N, 2)``.

    Parameters
    ----------
    rgb : Tensor, float, (N, 3, H, W)
        RGB in [0, 1].
    hed_from_rgb : Tensor, (3, 3)
        Row-vector deconvolution matrix (``hed = od @ hed_from_rgb``).
    """
    od, hed = _od_and_hed(rgb, hed_from_rgb)
    tissue = od.mean(dim=1).flatten(1) > TISSUE_OD
    return torch.stack(
        [_masked_quantile(hed[:, c].flatten(1), tissue, PERCENTILE) for c in (0, 1)], dim=1
    )


def normalise_he(
    rgb: torch.Tensor, hed_from_rgb: torch.Tensor, reference: torch.Tensor
) -> torch.Tensor:
    """RGB patches with H and E rescaled to the ``reference`` percentiles.

    Parameters
    ----------
    rgb : Tensor, float, (N, 3, H, W)
        RGB in [0, 1].
    hed_from_rgb : Tensor, (3, 3)
        Row-vector deconvolution matrix.
    reference : Tensor, (2,)
        Target :data:`PERCENTILE` of the H and E concentrations.

    Returns
    -------
    Tensor, float32, (N, 3, H, W)
        RGB in [0, 1] (rounding to 8 bits is not applied).
    """
    od, hed = _od_and_hed(rgb, hed_from_rgb)
    tissue = od.mean(dim=1).flatten(1) > TISSUE_OD
    gains = torch.ones(hed.shape[0], 3, device=hed.device)
    for c in (0, 1):
        level = _masked_quantile(hed[:, c].flatten(1), tissue, PERCENTILE).clamp_min(1e-3)
        gains[:, c] = (reference[c] / level).clamp(*GAIN_RANGE)
    rgb_from_hed = torch.linalg.inv(hed_from_rgb)
    od = F.conv2d(hed * gains[:, :, None, None], rgb_from_hed.T[:, :, None, None]).clamp_min(0.0)
    return ((256.0 * torch.exp(-od) - 1.0) / 255.0).clamp(0.0, 1.0)
