"""Quantitative susceptibility mapping: the numerical steps, each a separate, swappable function.

Default chain (multi-echo GRE, coil-combined phase in radians, echo times in seconds)::

    unwrapped = unwrap_echoes(phase, echo_times, magnitude=magnitude, mask=mask)
    field_hz, _, field_sd_hz = fit_field_linear(unwrapped, echo_times, magnitude=magnitude, mask=mask)
    local_ppm, eroded = remove_background_vsharp(hz_to_ppm(field_hz, b0_tesla), mask, voxel_size)
    chi = invert_tv_admm(local_ppm, eroded, voxel_size, b0_direction=b0_direction,
                         weights=magnitude_weights, phase_scale=2 * pi * gamma_bar * B0 * TE)
    chi, _ = reference_to_region(chi, reference_mask, mask=eroded)

Pure numpy/scipy on arrays; no file I/O.
"""

from .background import (
    erode_ball,
    mask_interior,
    remove_background_lbv,
    remove_background_pdf,
    remove_background_vsharp,
)
from .field import fit_field_complex, fit_field_linear
from .inversion import invert_ilsqr, invert_l2_gradient, invert_tkd, invert_tv_admm
from .masking import estimate_csf_mask, reliable_edge_mask
from .phase import combine_series, unwrap_echoes, unwrap_laplacian, unwrap_region_growing, wrap_phase
from .referencing import GAMMA_BAR_MHZ_PER_T, hz_to_ppm, ppm_to_hz, reference_to_region

__all__ = [
    "reliable_edge_mask",
    "estimate_csf_mask",
    "wrap_phase",
    "combine_series",
    "unwrap_echoes",
    "unwrap_laplacian",
    "unwrap_region_growing",
    "fit_field_linear",
    "fit_field_complex",
    "erode_ball",
    "remove_background_vsharp",
    "mask_interior",
    "remove_background_pdf",
    "remove_background_lbv",
    "invert_tkd",
    "invert_l2_gradient",
    "invert_ilsqr",
    "invert_tv_admm",
    "GAMMA_BAR_MHZ_PER_T",
    "hz_to_ppm",
    "ppm_to_hz",
    "reference_to_region",
]
