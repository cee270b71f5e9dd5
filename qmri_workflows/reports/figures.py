"""Figures of the visual report, drawn with matplotlib (Agg, PNG).

Every function takes arrays already oriented for display (first axis left to right, second
posterior to anterior, third inferior to superior: RAS, see :func:`to_ras`) and writes one PNG.
matplotlib is imported inside the functions: the App's ``--help`` and the numerical code never load
it, and the figures are drawn on :class:`matplotlib.figure.Figure` objects without pyplot, so no
window system or global figure state is involved.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "Window",
    "robust_window",
    "mosaic_slices",
    "to_ras",
    "montage",
    "map_mosaic",
    "overlay_mosaic",
    "region_histograms",
]

#: Axial slices shown per mosaic.
SLICES = 6
#: Resolution of the PNGs (dots per inch of the figure sizes below).
DPI = 90
#: Percentiles of the values inside the brain mask that bound a map's window.
WINDOW_PERCENTILES = (2.0, 98.0)
#: Percentiles of the values inside the brain mask that bound the histograms.
HISTOGRAM_PERCENTILES = (0.5, 99.5)


class Window:
    """Display range of a map: ``low``/``high`` and a colour map; signed maps are centred on 0."""

    def __init__(self, low, high, colormap):
        self.low, self.high, self.colormap = float(low), float(high), colormap

    def __repr__(self):
        return f"Window({self.low:.4g}, {self.high:.4g}, {self.colormap!r})"


def robust_window(values, mask, percentiles=WINDOW_PERCENTILES):
    """Window of a map from percentiles of its finite values inside ``mask``.

    A map whose window spans both signs (susceptibility, field maps) gets a symmetric window about
    zero and a diverging colour map, so that zero is the middle colour; others are grey.

    Returns
    -------
    Window or None
        None when the mask holds no finite value.
    """
    values = np.asarray(values)
    inside = values[np.asarray(mask, dtype=bool) & np.isfinite(values)]
    if inside.size == 0:
        return None
    low, high = np.percentile(inside, percentiles)
    if low < 0 < high:
        bound = max(-low, high)
        return Window(-bound, bound, "RdBu_r")
    if high <= low:  # a constant map: any window shows it
        low, high = low - 0.5 * (abs(low) or 1.0), high + 0.5 * (abs(high) or 1.0)
    return Window(low, high, "gray")


def mosaic_slices(mask, count=SLICES):
    """Indices of ``count`` axial slices spread over the mask's extent (its outer 10 % left out)."""
    mask = np.asarray(mask, dtype=bool)
    occupied = np.flatnonzero(mask.any(axis=(0, 1)))
    if occupied.size == 0:
        occupied = np.arange(mask.shape[2])
    first, last = occupied[0], occupied[-1]
    margin = 0.1 * (last - first)
    positions = np.linspace(first + margin, last - margin, count)
    return sorted(set(int(round(p)) for p in positions))


def to_ras(data, affine):
    """Reorient a volume to the closest RAS voxel order; returns ``(data, voxel_size)`` after it."""
    from nibabel import orientations

    orientation = orientations.io_orientation(affine)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    reoriented = orientations.apply_orientation(np.asarray(data), orientation)
    # input axis i becomes output axis orientation[i, 0]
    order = np.argsort(orientation[:, 0])
    voxel_size = tuple(float(zooms[int(axis)]) for axis in order)
    return reoriented, voxel_size


def montage(volume, slices, *, fill=np.nan):
    """The axial ``slices`` of ``volume`` side by side in one 2-D array (one voxel column of ``fill`` between).

    Rows run posterior to anterior and columns left to right, for ``imshow(..., origin="lower")``.
    One image in one axes draws about ten times faster than one axes per slice.
    """
    volume = np.asarray(volume)
    dtype = np.result_type(volume.dtype, np.asarray(fill).dtype)
    gap = np.full((volume.shape[1], 1), fill, dtype=dtype)
    planes = []
    for index, k in enumerate(slices):
        if index:
            planes.append(gap)
        planes.append(volume[:, :, k].T.astype(dtype))
    return np.concatenate(planes, axis=1)


def _slice_labels(axes, volume_shape, slices):
    """``k=<index>`` above each slice of a montage (text, not axes titles: those are slow to lay out)."""
    width = volume_shape[0] + 1
    for index, k in enumerate(slices):
        axes.text(
            index * width + volume_shape[0] / 2,
            volume_shape[1] - 0.5,
            f"k={k}",
            color="white",
            fontsize=7,
            ha="center",
            va="bottom",
        )


def _montage_figure(volume_shape, slices, voxel_size, *, right):
    """A black figure with one axes for a montage, sized to keep the voxels' aspect."""
    from matplotlib.figure import Figure

    width_mm = (volume_shape[0] + 1) * len(slices) * voxel_size[0]
    height_mm = volume_shape[1] * voxel_size[1]
    height = 2.0
    image_width = height * 0.88 * width_mm / height_mm
    figure = Figure(figsize=(image_width / right + 0.05, height), dpi=DPI, facecolor="black")
    axes = figure.add_axes([0.0, 0.02, right, 0.86])
    axes.set_axis_off()
    return figure, axes


def map_mosaic(values, path, *, slices, window, voxel_size, label):
    """Axial slices of one map with its colour bar (``label``: name and unit); writes ``path``."""
    import matplotlib

    colormap = matplotlib.colormaps[window.colormap].with_extremes(bad="black")
    figure, axes = _montage_figure(values.shape, slices, voxel_size, right=0.86)
    image = axes.imshow(
        montage(np.asarray(values, dtype=float), slices),
        origin="lower",
        aspect=voxel_size[1] / voxel_size[0],
        interpolation="nearest",
        cmap=colormap,
        vmin=window.low,
        vmax=window.high,
    )
    _slice_labels(axes, values.shape, slices)
    bar = figure.colorbar(image, cax=figure.add_axes([0.875, 0.1, 0.015, 0.76]))
    bar.set_label(label, color="white", fontsize=8)
    bar.ax.tick_params(colors="white", labelsize=7)
    figure.savefig(path, facecolor="black")
    return path


def overlay_mosaic(anatomy, path, *, slices, voxel_size, brain_mask=None, lesion_mask=None, regions=None):
    """Masks over anatomy: the brain mask's outline, lesions in red, regions in colour; writes ``path``.

    Parameters
    ----------
    anatomy : ndarray
        Background (first-echo magnitude or S0), windowed at its 1st-99th percentiles.
    regions : dict of str -> ndarray of bool, optional
        Region masks drawn as translucent colours with a legend.

    Returns
    -------
    list of (str, str)
        Legend entries ``(name, colour)`` drawn.
    """
    import matplotlib
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    anatomy = np.asarray(anatomy, dtype=float)
    finite = anatomy[np.isfinite(anatomy)]
    low, high = np.percentile(finite, (1, 99)) if finite.size else (0.0, 1.0)
    palette = matplotlib.colormaps["tab10"]
    region_names = list(regions or {})
    labels = np.zeros(anatomy.shape, dtype=np.int16)
    for number, name in enumerate(region_names, start=1):
        labels[np.asarray(regions[name], dtype=bool) & (labels == 0)] = number
    region_colours = [palette(i % 10) for i in range(len(region_names))]
    legend = [(name, matplotlib.colors.to_hex(colour)) for name, colour in zip(region_names, region_colours)]
    if brain_mask is not None:
        legend.append(("brain mask (outline)", "#ffd700"))
    if lesion_mask is not None:
        legend.append(("lesions", "#ff0000"))

    figure, axes = _montage_figure(anatomy.shape, slices, voxel_size, right=0.8)
    shown = {"origin": "lower", "aspect": voxel_size[1] / voxel_size[0], "interpolation": "nearest"}
    axes.imshow(montage(anatomy, slices), cmap="gray", vmin=low, vmax=high, **shown)
    if region_names:
        planes = np.ma.masked_equal(montage(labels, slices, fill=0), 0)
        axes.imshow(
            planes, cmap=ListedColormap(region_colours), vmin=0.5, vmax=len(region_names) + 0.5, alpha=0.45, **shown
        )
    if brain_mask is not None and np.any(brain_mask):
        outline = montage(np.asarray(brain_mask, dtype=float), slices, fill=0.0)
        axes.contour(outline, levels=[0.5], colors=["#ffd700"], linewidths=0.8)
    if lesion_mask is not None and np.any(lesion_mask):
        planes = np.ma.masked_equal(montage(np.asarray(lesion_mask, dtype=np.int8), slices, fill=0), 0)
        axes.imshow(planes, cmap=ListedColormap(["#ff0000"]), vmin=0, vmax=1, alpha=0.8, **shown)
    _slice_labels(axes, anatomy.shape, slices)
    if legend:
        handles = [Patch(color=colour, label=name) for name, colour in legend]
        figure.legend(
            handles=handles,
            loc="center left",
            bbox_to_anchor=(0.805, 0.5),
            fontsize=6,
            frameon=False,
            labelcolor="white",
        )
    figure.savefig(path, facecolor="black")
    return legend


def region_histograms(values, masks, path, *, value_range, label):
    """Histograms of one map in each region (densities, so small regions show); writes ``path``.

    Parameters
    ----------
    value_range : (float, float)
        Range of the bins; values outside it are left out, and the legend gives each region's
        voxel count and how many fell outside.

    Returns
    -------
    int
        Regions drawn (those with two finite values or more).
    """
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=float)
    figure = Figure(figsize=(7.0, 3.0), dpi=DPI)
    axes = figure.add_axes([0.09, 0.17, 0.56, 0.76])
    edges = np.linspace(value_range[0], value_range[1], 61)
    drawn = 0
    for name, mask in masks.items():
        inside = values[np.asarray(mask, dtype=bool) & np.isfinite(values)]
        if inside.size < 2:
            continue
        shown = inside[(inside >= edges[0]) & (inside <= edges[-1])]
        density, _ = np.histogram(shown, bins=edges, density=shown.size > 0)
        outside = inside.size - shown.size
        axes.stairs(
            density, edges, label=f"{name} ({inside.size} vx" + (f", {outside} out of range)" if outside else ")")
        )
        drawn += 1
    axes.set_xlabel(label)
    axes.set_ylabel("density")
    if drawn:
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.savefig(path)
    return drawn
