"""Validation reports: `report.json` for CI and a self-contained `report.html` (rendered from the
Jinja2 template `templates/report.html.j2`), written atomically."""

from __future__ import annotations

import base64
import functools
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from PIL import Image

from instaflow_edge.atomic import atomic_file
from instaflow_edge.errors import UserError
from instaflow_edge.jsonio import dumps

JSON_NAME = "report.json"
HTML_NAME = "report.html"
TEMPLATE = "report.html.j2"  # in instaflow_edge/templates/
# The difference heat map's colour ramp: black, purple, red, yellow, white.
HEAT_STOPS = np.array([[0, 0, 0], [90, 20, 130], [220, 50, 40], [250, 200, 40], [255, 255, 255]])


def write_reports(
    out_dir: Path,
    report: dict[str, Any],
    reference_images: np.ndarray | None = None,
    bundle_images: np.ndarray | None = None,
) -> tuple[Path, Path]:
    """Write `report.json` and `report.html` into `out_dir` (created if needed); return both paths."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"report folder {out_dir} is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / JSON_NAME, out_dir / HTML_NAME
    with atomic_file(json_path) as staging:
        staging.write_text(dumps(report), encoding="utf-8")
    with atomic_file(html_path) as staging:
        staging.write_text(render_html(report, reference_images, bundle_images), encoding="utf-8")
    return json_path, html_path


# -- HTML -----------------------------------------------------------------------------------------
def render_html(
    report: dict[str, Any],
    reference_images: np.ndarray | None = None,
    bundle_images: np.ndarray | None = None,
) -> str:
    """One HTML page with no external assets: images are inline PNGs, the chart inline SVG.

    The page is the template; this computes only what a template cannot: the PNGs (the two sides
    and their difference heat map, per end-to-end image) and the latency chart's geometry."""
    end_to_end = report["end_to_end"]
    figures = None
    if end_to_end and reference_images is not None and bundle_images is not None:
        figures = [
            _figures(reference_images[index], bundle_images[index])
            for index in range(len(end_to_end["per_image"]))
        ]
    chart = latency_chart(report["latency"]) if report["latency"] else None
    template = _templates().get_template(TEMPLATE)
    return template.render(report=report, figures=figures, chart=chart)


@functools.cache
def _templates() -> Environment:
    environment = Environment(
        loader=PackageLoader("instaflow_edge", "templates"),
        autoescape=True,  # prompts and paths are user text
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["num"] = number
    environment.filters["all_passed"] = all_passed
    return environment


def number(value: Any, digits: int = 2) -> str:
    """A report value as text: None is "off", booleans lower case, floats to `digits` places."""
    if value is None:
        return "off"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def all_passed(checks: list[dict[str, Any]], prefix: str = "") -> bool:
    """Whether every check whose gate starts with `prefix` (all of them by default) passed."""
    return all(check["passed"] for check in checks if check["gate"].startswith(prefix))


def _figures(reference: np.ndarray, bundle: np.ndarray) -> list[dict[str, str]]:
    heat, peak = difference_heat_map(reference, bundle)
    return [
        {"src": png_data_uri(reference), "caption": "reference (PyTorch)"},
        {"src": png_data_uri(bundle), "caption": "bundle"},
        {"src": png_data_uri(heat), "caption": f"|difference|, black 0 to white {peak} levels"},
    ]


def png_data_uri(image: np.ndarray) -> str:
    """An HWC uint8 image as a `data:image/png;base64,...` URI."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def difference_heat_map(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel mean |difference| over channels as a colour ramp (HWC uint8) and its peak level."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).mean(axis=-1)
    peak = max(int(np.ceil(diff.max())), 1)
    positions = np.linspace(0, 1, len(HEAT_STOPS))
    scaled = diff / peak
    channels = [np.interp(scaled, positions, HEAT_STOPS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8), peak


def latency_chart(latency: dict) -> dict[str, Any]:
    """The latency chart's geometry: p50 bars per part, bundle beside PyTorch, each part scaled to
    its slower side's p90, with p90 whiskers. The template draws it as inline SVG."""
    rows = latency["rows"]
    label_width, bar_width, bar_height, gap = 110, 420, 14, 14
    parts = []
    for index, (name, row) in enumerate(rows.items()):
        top = gap + index * (2 * bar_height + gap)
        scale = bar_width / max(row["bundle"]["p90_ms"], row["reference"]["p90_ms"])
        bars = []
        for offset, (side, label, fill) in enumerate(
            (("bundle", "bundle", "#1a73e8"), ("reference", "PyTorch", "#999"))
        ):
            p50, p90 = row[side]["p50_ms"], row[side]["p90_ms"]
            y = top + offset * bar_height
            bars.append(
                {
                    "label": label,
                    "fill": fill,
                    "p50_ms": p50,
                    "x": label_width,
                    "y": y,
                    "width": p50 * scale,
                    "height": bar_height - 2,
                    "p50_x": label_width + p50 * scale,
                    "p90_x": label_width + p90 * scale,
                    "middle": y + bar_height / 2 - 1,
                    "text_x": label_width + p90 * scale + 4,
                    "text_y": y + bar_height - 3,
                }
            )
        parts.append({"name": name, "label_y": top + bar_height + 4, "bars": bars})
    return {
        "width": label_width + bar_width + 160,
        "height": len(rows) * (2 * bar_height + gap) + gap,
        "parts": parts,
    }
