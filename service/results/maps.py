"""Findings -> map series: colour maps radiologists scroll, and the quantitative values for machines.

Per map (CBF, CBV, MTT, TTP, Tmax; ADC for MRI) two series on the source grid:
- a colour series, one RGB Secondary Capture per slice with a colour bar, the map's name and units,
  R/L markers and the research banner; any viewer shows and scrolls it;
- a Parametric Map (float32 values in the map's UCUM unit, one frame per source slice), which
  OHIF, 3D Slicer and measuring tools read as numbers.
Colour scales are perceptually uniform and colour-blind safe (matplotlib's viridis family); each
map has a fixed, documented display range, so the same colour means the same value in every study.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from service.findings import Findings, MapName
from service.results import identity
from service.results.summary import side_markers


@dataclass(frozen=True)
class MapStyle:
    """How a map is shown: title, display range in its unit, colour scale and series numbers."""

    title: str
    display_range: tuple[float, float]
    colour_scale: str
    colour_series_number: int
    value_series_number: int


MAP_STYLES: dict[MapName, MapStyle] = {
    MapName.CBF: MapStyle(MapName.CBF.title, (0.0, 80.0), "inferno", 911, 921),
    MapName.CBV: MapStyle(MapName.CBV.title, (0.0, 6.0), "inferno", 912, 922),
    MapName.MTT: MapStyle(MapName.MTT.title, (0.0, 12.0), "viridis", 913, 923),
    MapName.TTP: MapStyle(MapName.TTP.title, (0.0, 30.0), "viridis", 914, 924),
    MapName.TMAX: MapStyle(MapName.TMAX.title, (0.0, 12.0), "viridis", 915, 925),
    MapName.ADC: MapStyle(MapName.ADC.title, (0.0, 1600.0), "cividis", 916, 926),
}
"""Each map's look; its series numbers are 911 + ``MapName.place`` (colour) and 921 + place (values)."""
BAR_WIDTH_PX = 150


def colour_bar(name: MapName, rows: int) -> np.ndarray:
    """The colour bar panel (rows, BAR_WIDTH_PX, 3) with ticks, name and unit, drawn once per map."""
    style = MAP_STYLES[name]
    dpi = 100
    figure = own_figure(BAR_WIDTH_PX / dpi, rows / dpi, dpi)
    axes = figure.add_axes((0.12, 0.17, 0.18, 0.66))
    gradient = np.linspace(*style.display_range, 256)[:, None]
    axes.imshow(gradient, aspect="auto", cmap=style.colour_scale, origin="lower",
                extent=(0, 1, *style.display_range))
    axes.set_xticks([])
    axes.yaxis.tick_right()
    axes.tick_params(colors="white", labelsize=max(7, rows // 40))
    figure.text(0.5, 0.97, style.title, color="white", ha="center", va="top", fontsize=max(9, rows // 22), weight="bold")
    figure.text(0.5, 0.90, name.unit, color="white", ha="center", va="top", fontsize=max(7, rows // 40))
    figure.text(0.5, 0.01, "RESEARCH USE\nONLY", color=(240 / 255, 228 / 255, 66 / 255), ha="center", va="bottom",
                fontsize=max(6, rows // 50), weight="bold")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="rgba", dpi=dpi, facecolor="black")
    width, height = figure.canvas.get_width_height()
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).reshape(height, width, 4)[:rows, :BAR_WIDTH_PX, :3]


def colour_slices(name: MapName, volume: np.ndarray, side_markers: tuple[str, str] = ("", "")) -> np.ndarray:
    """Every slice in colour with the bar beside it: (slices, rows, columns + BAR_WIDTH_PX, 3) uint8.
    ``side_markers`` are the patient sides at the image's left and right edges, stamped top left and right."""
    style = MAP_STYLES[name]
    low, high = style.display_range
    scaled = np.clip((np.nan_to_num(volume) - low) / (high - low), 0.0, 1.0)
    rgb = (colormaps[style.colour_scale](scaled)[..., :3] * 255).astype(np.uint8)
    rgb[volume <= 0] = 0  # outside the brain stays black, not the scale's lowest colour
    size = max(12, volume.shape[1] // 16)
    for letter, at_right in zip(side_markers, (False, True)):
        if letter:
            glyph = _glyph(letter, size)
            column = volume.shape[2] - glyph.shape[1] - 2 if at_right else 2
            region = rgb[:, 2 : 2 + glyph.shape[0], column : column + glyph.shape[1]]
            np.maximum(region, glyph[None, ..., None], out=region)
    bar = colour_bar(name, volume.shape[1])
    return np.concatenate([rgb, np.broadcast_to(bar, (volume.shape[0], *bar.shape))], axis=2)


def own_figure(width_in: float, height_in: float, dpi: int) -> Figure:
    """A black figure with its own Agg canvas: nothing of pyplot's global state, so workers on
    several threads draw at the same time safely."""
    figure = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="black")
    FigureCanvasAgg(figure)
    return figure


def _glyph(letter: str, size: int) -> np.ndarray:
    """A white letter on black, (size, size) uint8, for burning markers into slices."""
    figure = own_figure(size / 100, size / 100, 100)
    figure.text(0.5, 0.5, letter, color="white", ha="center", va="center", fontsize=size * 0.6, weight="bold")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="rgba", dpi=100, facecolor="black")
    width, height = figure.canvas.get_width_height()
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).reshape(height, width, 4)[:size, :size, 0].copy()


def build_colour_series(findings: Findings, name: MapName | str) -> list[Dataset]:
    """One RGB Secondary Capture per source slice, in slice order, for the map ``name``."""
    name = MapName(name)
    style = MAP_STYLES[name]
    frames = colour_slices(name, findings.maps[name], side_markers(findings))
    series_uid = identity.result_uid(findings.study_uid, findings.version, f"{name}-colour-series")
    images = []
    for index, (pixels, source) in enumerate(zip(frames, findings.source_images, strict=True)):
        sc = hd.sc.SCImage.from_ref_dataset(
            source, np.ascontiguousarray(pixels), hd.PhotometricInterpretationValues.RGB, 8,
            hd.CoordinateSystemNames.PATIENT, series_instance_uid=series_uid,
            series_number=style.colour_series_number,
            sop_instance_uid=identity.result_uid(findings.study_uid, findings.version, f"{name}-colour-{index}"),
            instance_number=index + 1, manufacturer=identity.MANUFACTURER, patient_orientation=("L", "P"),
        )
        sc.SeriesDescription = f"StrokeGate {style.title} colour v{findings.version} (RESEARCH USE ONLY)"[:64]
        sc.ImageComments = identity.RESEARCH_USE_ONLY
        sc.BurnedInAnnotation = "YES"
        sc.Laterality = None  # unpaired body part; the General Series module wants it present
        sc.SliceLocation = source.get("SliceLocation")
        images.append(sc)
    return images


def build_parametric_map(findings: Findings, name: MapName | str) -> Dataset:
    """The map's values (float32, UCUM unit) as a Parametric Map on the source grid."""
    name = MapName(name)
    style = MAP_STYLES[name]
    values = np.nan_to_num(findings.maps[name]).astype(np.float32)
    unit = name.unit
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=name.upper(), lut_explanation=f"{style.title} ({unit})", unit=Code(unit, "UCUM", unit),
        value_range=(float(values.min()), float(values.max())), slope=1.0, intercept=0.0,
    )
    low, high = style.display_range
    pm = hd.pm.ParametricMap(
        source_images=findings.source_images, pixel_array=values,
        series_instance_uid=identity.result_uid(findings.study_uid, findings.version, f"{name}-values-series"),
        series_number=style.value_series_number,
        sop_instance_uid=identity.result_uid(findings.study_uid, findings.version, f"{name}-values"),
        instance_number=1, manufacturer=identity.MANUFACTURER,
        manufacturer_model_name=identity.MANUFACTURER_MODEL_NAME, software_versions=identity.SOFTWARE_VERSIONS,
        device_serial_number=identity.DEVICE_SERIAL_NUMBER, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(low + high) / 2, window_width=high - low)],
        content_label=name.upper(), content_description=f"{style.title} in {unit}; research use only",
    )
    pm.SeriesDescription = f"StrokeGate {style.title} values v{findings.version} (RESEARCH USE ONLY)"[:64]
    pm.Laterality = None  # unpaired body part; the General Series module wants it present
    return pm
