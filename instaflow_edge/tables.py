"""Plain-text tables the commands print: parity after export, validation, latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from instaflow_edge.gates import number


def format_table(rows: list[list[str]]) -> str:
    """Rows of cells as left-aligned columns (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _db(value: float | str) -> str:
    shown = number(value)
    return "inf dB (identical)" if shown == "inf" else f"{shown} dB"


def parity_summary(bundle: Path) -> str:
    """Where the bundle is and the parity numbers its manifest recorded, as a few lines."""
    from instaflow_edge.manifest import read_manifest

    manifest = read_manifest(bundle)
    what = manifest.quantization or manifest.precision
    lines = [f"bundle: {bundle} ({manifest.target}, {what}, {len(manifest.components)} graphs)"]
    if manifest.runtime_options:
        settings = ", ".join(f"{key}={value}" for key, value in manifest.runtime_options.items())
        lines.append(f"runtime options (recorded, applied at every load): {settings}")
    parity = manifest.details.get("parity", {})
    if "skipped" in parity:
        return "\n".join([*lines, f"parity not checked: {parity['skipped']}"])
    lines.append(f"parity vs {parity['against']} on {parity['executed_on']}:")
    for name, metrics in [*parity["components"].items(), ("end_to_end", parity["end_to_end"])]:
        if metrics.get("finite") is False:
            numbers = "NaN or Inf in the output"
        elif "psnr_db" in metrics:
            numbers = f"tensor PSNR {_db(metrics['psnr_db'])}, cosine {metrics['cosine']:.6f}"
        else:
            numbers = f"image PSNR {_db(metrics['image_psnr_db'])}, SSIM {metrics['ssim']:.4f}"
        if "vs_three_graphs_image_psnr_db" in metrics:
            numbers += f"; vs the three graphs {_db(metrics['vs_three_graphs_image_psnr_db'])}"
        lines.append(f"  {name:<13} max-abs {metrics['max_abs']:<10.3g} {numbers}")
    for name, notes in manifest.details.get("notes", {}).items():
        nodes = notes.get("fp32_nodes")
        if nodes:
            kept = "the whole graph" if nodes == ["*"] else f"{len(nodes)} ops"
            lines.append(f"  {name}: beyond fp16 range, {kept} kept in fp32")
    sizes = manifest.details.get("sizes")
    if sizes:
        lines.append(
            f"size: {sizes['bytes_before'] / 2**20:.2f} MiB -> {sizes['bytes_after'] / 2**20:.2f} "
            f"MiB ({sizes['ratio']:.2f}x smaller)"
        )
    return "\n".join(lines)


def parity_table(report: dict[str, Any]) -> str:
    """Per component and end to end: the numbers the gates read, and the verdict."""
    rows = [["component", "output", "max-abs", "cosine", "tensor PSNR", "gates"]]
    for name, result in report["components"].items():
        if not result["compared"]:
            rows.append([name, "-", "-", "-", "-", result["reason"]])
            continue
        verdict = "passed" if all(c["passed"] for c in result["checks"]) else "FAILED"
        for output, m in result["outputs"].items():
            rows.append(
                [
                    name,
                    output,
                    f"{m['max_abs']:.3g}",
                    f"{m['cosine']:.6f}",
                    _db(m["psnr_db"]),
                    verdict,
                ]
            )
    tokens = report["tokenizer"]
    verdict = "passed" if all(c["passed"] for c in tokens["checks"]) else "FAILED"
    identical = f"{tokens['identical_prompts']}/{tokens['prompts']} prompts identical"
    rows.append(["tokenizer", "token ids", identical, "", "", verdict])
    end = report["end_to_end"]
    verdict = "passed" if all(c["passed"] for c in end["checks"]) else "FAILED"
    rows.append(
        ["end_to_end", "image", f"SSIM {end['ssim']:.4f}", "", _db(end["image_psnr_db"]), verdict]
    )
    return format_table(rows)


def latency_table(latency: dict[str, Any]) -> str:
    """The rows as aligned text: part, bundle p50/p90, PyTorch p50/p90, ratio."""
    rows = [["part", "bundle p50", "p90", "PyTorch p50", "p90", "ratio (p50)"]]
    for name, row in latency["rows"].items():
        rows.append(
            [
                name,
                f"{row['bundle']['p50_ms']:.2f} ms",
                f"{row['bundle']['p90_ms']:.2f} ms",
                f"{row['reference']['p50_ms']:.2f} ms",
                f"{row['reference']['p90_ms']:.2f} ms",
                f"{row['ratio_p50']:.2f}x",
            ]
        )
    return format_table(rows)


PART_LABELS = {
    "text_encoder": "TE",
    "unet": "UNet",
    "vae_decoder": "VAE dec",
    "end_to_end": "end to end",
}


def bench_rows(result: dict[str, Any]) -> list[list[str]]:
    """The bench as rows (header first): per bundle and batch, each part's p50 with its speed
    against PyTorch fp32, each part's PSNR, images/s and GFLOP/s of the last part (end to end
    when timed), peak memory and size on disk."""
    parts, batches = result["settings"]["parts"], result["settings"]["batches"]
    last = parts[-1]
    rows = [
        [
            "bundle",
            "runs as",
            "batch",
            *(f"{PART_LABELS[p]} ms (speed)" for p in parts),
            *(f"{PART_LABELS[p]} PSNR" for p in parts),
            f"{PART_LABELS[last]} img/s",
            "GFLOP/s",
            "peak MiB",
            "MiB",
        ]
    ]
    found = {(r["bundle"], r["part"], r["batch"]): r for r in result["rows"]}
    for entry in result["bundles"]:
        runtime = entry["runtime"]
        runs_as = " ".join(
            str(runtime[key]) for key in ("executed_on", "executed_precision") if key in runtime
        )
        for b in batches:
            cells = [found[entry["name"], part, b] for part in parts]
            psnr = ["-" if c["psnr_db"] is None else number(c["psnr_db"]) for c in cells]
            peak, size = entry["peak_rss_mib"], cells[-1]["size_mib"]
            rows.append(
                [
                    entry["name"],
                    runs_as,
                    str(b),
                    *(f"{c['p50_ms']:.2f} ({c['speedup_p50']:.2f}x)" for c in cells),
                    *psnr,
                    f"{cells[-1]['images_per_s']:.1f}",
                    f"{cells[-1]['gflop_per_s']:.1f}",
                    "-" if peak is None else f"{peak:.0f}",
                    "-" if size is None else f"{size:.2f}",
                ]
            )
    return rows


def bench_table(result: dict[str, Any]) -> str:
    """The bench as aligned text, with the bundles that were skipped and why."""
    lines = [format_table(bench_rows(result))]
    lines += [f"skipped {s['bundle']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


def bench_markdown(result: dict[str, Any], command: str) -> str:
    """The bench as Markdown (what the README's Performance section shows): the command that
    made it, the machine, the table, what each column means and what was skipped."""
    env, settings = result["environment"], result["settings"]
    load = env["load_average_1min"]
    versions = env["library_versions"]
    libraries = ", ".join(
        f"{name} {versions[name]}"
        for name in ("torch", "onnxruntime", "onnxruntime-gpu", "openvino")
        if name in versions
    )
    rows = bench_rows(result)
    table = [
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
        *("| " + " | ".join(row) + " |" for row in rows[1:]),
    ]
    lines = [
        f"`{command}`",
        "",
        f"Model {result['model']['id']}; {env['cpu']['model']} ({', '.join(env['cpu']['flags'])}),"
        f" {env['threads']['cpu_count']} cores, {env['memory_gib']:.0f} GiB; torch threads "
        f"{env['threads']['torch']}; {libraries}; Python {env['python']}. "
        f"{settings['runs']} timed rounds after {settings['warmup']} warm-up, every bundle and "
        f"PyTorch fp32 once per round, interleaved; load average {load['before']:.1f} before, "
        f"{load['after']:.1f} after (other work on the machine); {result['created'][:10]}.",
        "",
        *table,
        "",
        "ms: p50 of the call; speed: PyTorch fp32's p50 / the bundle's, same rounds (above 1x: "
        "faster). PSNR (dB) against PyTorch fp32 on the same inputs: tensor per component, 8-bit "
        f"image end to end. img/s and GFLOP/s ({PART_LABELS[settings['parts'][-1]]}): batch / "
        "p50, and the reference's FLOPs (torch's flop counter) / p50. peak MiB: the process's peak "
        "resident memory above its level before, while the bundle loaded and ran each call once. "
        "MiB: the bundle's files on disk.",
    ]
    if result["skipped"]:
        lines += ["", *(f"- skipped {s['bundle']}: {s['reason']}" for s in result["skipped"])]
    return "\n".join(lines) + "\n"
