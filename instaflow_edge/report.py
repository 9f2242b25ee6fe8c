"""Validation reports: `report.json` for CI and a self-contained `report.html`, written atomically."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from instaflow_edge.atomic import atomic_file
from instaflow_edge.errors import UserError

JSON_NAME = "report.json"
HTML_NAME = "report.html"
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
        text = json.dumps(json_ready(report), indent=2, allow_nan=False)
        staging.write_text(text + "\n", encoding="utf-8")
    with atomic_file(html_path) as staging:
        staging.write_text(render_html(report, reference_images, bundle_images), encoding="utf-8")
    return json_path, html_path


def json_ready(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN and infinities to the strings "nan", "inf", "-inf"."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# -- HTML -----------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.9em; }
th { background: #f2f2f2; }
.passed { color: #137333; font-weight: bold; } .failed { color: #c5221f; font-weight: bold; }
.skipped { color: #b06000; font-weight: bold; }
figure { display: inline-block; margin: 0 0.8em 0.8em 0; text-align: center; }
figure img { width: 192px; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 0.8em; }
code { background: #f6f6f6; padding: 0 0.2em; }
"""


def render_html(
    report: dict[str, Any],
    reference_images: np.ndarray | None = None,
    bundle_images: np.ndarray | None = None,
) -> str:
    """One HTML page with no external assets: images are inline PNGs, the chart inline SVG."""
    status = report["status"]
    bundle = report["bundle"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>instaflow-edge validate: {_e(bundle['path'])}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>instaflow-edge validation report</h1>",
        f'<p class="{_e(status)}">{_e(report["summary"])}</p>',
        _table(
            None,
            [
                ["bundle", bundle["path"]],
                ["target / precision / quantization", _target(bundle)],
                ["source model", bundle["source_model"].get("id", "?")],
                ["reference", _reference(report["reference"])],
                ["created", report["created"]],
                ["toolkit", report["toolkit_version"]],
            ],
        ),
        "<h2>Gates</h2>",
        _gates(report["gates"]),
    ]
    if report["components"]:
        parts += ["<h2>Components (same inputs for both sides)</h2>", _components(report)]
    if report["end_to_end"]:
        parts += ["<h2>End to end</h2>", _end_to_end(report, reference_images, bundle_images)]
    if report["latency"]:
        parts += ["<h2>Latency</h2>", _latency(report["latency"])]
    parts += ["<h2>Environment</h2>", _environment(report["environment"]), "</body></html>"]
    return "\n".join(parts) + "\n"


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: list[str] | None, rows: list[list[Any]]) -> str:
    """A table; header None makes a key-value table with the keys as row headers."""
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header or [])
    body = "".join(
        "<tr>"
        + "".join(
            cell
            if _is_html(cell)
            else (
                f"<th>{_e(cell)}</th>" if header is None and column == 0 else f"<td>{_e(cell)}</td>"
            )
            for column, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


class _Html(str):
    """A table cell that is already HTML (a <td> with markup)."""


def _is_html(cell: Any) -> bool:
    return isinstance(cell, _Html)


def _verdict(passed: bool) -> _Html:
    word = "passed" if passed else "failed"
    return _Html(f'<td class="{word}">{word}</td>')


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "off"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _target(bundle: dict) -> str:
    return f"{bundle['target']} / {bundle['precision']} / {bundle['quantization'] or 'none'}"


def _reference(reference: dict | None) -> str:
    if reference is None:
        return "not loaded"
    same = (
        "same weights as the bundle's source"
        if reference["matches_bundle_source"]
        else ("DIFFERENT weights from the bundle's source")
    )
    return f"{reference['model']} ({same}, sha256 {reference['weights_sha256'][:12]})"


def _gates(gates: dict) -> str:
    overridden = set(gates["overridden"])
    rows = [
        [
            name,
            _fmt(gates[name]),
            "overridden" if name in overridden else f"{gates['basis']} default",
        ]
        for name in ("min_tensor_psnr_db", "min_image_psnr_db", "min_unet_cosine")
    ]
    rows.append(["NaN or Inf in any output", "fails", "always"])
    return _table(["gate", "threshold", "from"], rows)


def _components(report: dict) -> str:
    rows = []
    for name, result in report["components"].items():
        if not result["compared"]:
            rows.append([name, "-", "-", "-", "-", "-", result["reason"]])
            continue
        for output, m in result["outputs"].items():
            checks = [c for c in result["checks"] if c["gate"].startswith(output)]
            rows.append(
                [
                    name,
                    output,
                    _fmt(m["max_abs"], 6),
                    _fmt(m["mean_abs"], 6),
                    _fmt(m["cosine"], 6),
                    _fmt(m["psnr_db"]),
                    _verdict(all(c["passed"] for c in checks)),
                ]
            )
    header = ["component", "output", "max-abs", "mean-abs", "cosine", "tensor PSNR (dB)", "gates"]
    return _table(header, rows)


def _end_to_end(
    report: dict, reference_images: np.ndarray | None, bundle_images: np.ndarray | None
) -> str:
    result = report["end_to_end"]
    verdict = _verdict(all(c["passed"] for c in result["checks"]))
    summary = _table(
        ["image PSNR (dB)", "SSIM", "gates"],
        [[_fmt(result["image_psnr_db"]), _fmt(result["ssim"], 4), verdict]],
    )
    figures = []
    for index, image in enumerate(result["per_image"]):
        caption = (
            f"seed {image['seed']}: {_fmt(image['image_psnr_db'])} dB, "
            f"SSIM {_fmt(image['ssim'], 4)}"
        )
        figures.append(f"<h3>{_e(image['prompt'])}</h3><p>{_e(caption)}</p>")
        if reference_images is not None and bundle_images is not None:
            ref, out = reference_images[index], bundle_images[index]
            heat, peak = difference_heat_map(ref, out)
            figures += [
                _figure(ref, "reference (PyTorch)"),
                _figure(out, "bundle"),
                _figure(heat, f"|difference|, black 0 to white {peak} levels"),
            ]
    return summary + "".join(figures)


def difference_heat_map(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel mean |difference| over channels as a colour ramp (HWC uint8) and its peak level."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).mean(axis=-1)
    peak = max(int(np.ceil(diff.max())), 1)
    positions = np.linspace(0, 1, len(HEAT_STOPS))
    scaled = diff / peak
    channels = [np.interp(scaled, positions, HEAT_STOPS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8), peak


def _figure(image: np.ndarray, caption: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _latency(latency: dict) -> str:
    rows = [
        [
            name,
            _fmt(row["bundle"]["p50_ms"]),
            _fmt(row["bundle"]["p90_ms"]),
            _fmt(row["reference"]["p50_ms"]),
            _fmt(row["reference"]["p90_ms"]),
            f"{row['ratio_p50']:.2f}x",
        ]
        for name, row in latency["rows"].items()
    ]
    header = ["part", "bundle p50 (ms)", "p90", "PyTorch p50 (ms)", "p90", "ratio (p50)"]
    note = (
        f"<p>{latency['warmup']} warm-up runs, then {latency['runs']} timed runs each, "
        f"batch {latency['batch']}; ratio = bundle / PyTorch (below 1: the bundle is faster).</p>"
    )
    return note + _table(header, rows) + latency_svg(latency)


def latency_svg(latency: dict) -> str:
    """p50 bars per part, bundle beside PyTorch, each part scaled to its slower side; p90 whiskers."""
    rows = latency["rows"]
    label_width, bar_width, bar_height, gap = 110, 420, 14, 14
    height = len(rows) * (2 * bar_height + gap) + gap
    items = []
    for index, (name, row) in enumerate(rows.items()):
        top = gap + index * (2 * bar_height + gap)
        scale = bar_width / max(row["bundle"]["p90_ms"], row["reference"]["p90_ms"])
        items.append(f'<text x="0" y="{top + bar_height + 4}" font-size="12">{_e(name)}</text>')
        for offset, (side, colour) in enumerate((("bundle", "#1a73e8"), ("reference", "#999"))):
            p50, p90 = row[side]["p50_ms"], row[side]["p90_ms"]
            y = top + offset * bar_height
            label = "bundle" if side == "bundle" else "PyTorch"
            items.append(
                f'<rect x="{label_width}" y="{y}" width="{p50 * scale:.1f}" '
                f'height="{bar_height - 2}" fill="{colour}"/>'
                f'<line x1="{label_width + p50 * scale:.1f}" x2="{label_width + p90 * scale:.1f}" '
                f'y1="{y + bar_height / 2 - 1}" y2="{y + bar_height / 2 - 1}" stroke="#333"/>'
                f'<text x="{label_width + p90 * scale + 4:.1f}" y="{y + bar_height - 3}" '
                f'font-size="11">{label} {p50:.2f} ms</text>'
            )
    width = label_width + bar_width + 160
    return (
        f'<svg width="{width}" height="{height}" '
        f'role="img" aria-label="latency p50 with p90 whiskers">{"".join(items)}</svg>'
    )


def _environment(environment: dict) -> str:
    rows = [[key, _fmt(value)] for key, value in environment.items() if not isinstance(value, dict)]
    for key in ("threads", "library_versions"):
        for name, value in environment.get(key, {}).items():
            rows.append([f"{key}: {name}", _fmt(value)])
    return _table(None, rows)
