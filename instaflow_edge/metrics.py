"""Parity metrics (numpy only): tensor max/mean-abs, cosine and PSNR; image PSNR and SSIM."""

from __future__ import annotations

import math

import numpy as np


def tensor_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """max-abs, mean-abs, cosine and tensor PSNR = 20 log10(max|ref| / RMSE) (Apple's definition).

    `finite` is False when the candidate holds NaN or Inf; the other numbers are then NaN.
    """
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(candidate, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, candidate {out.shape}")
    if not np.isfinite(out).all():
        nan = float("nan")
        return {"max_abs": nan, "mean_abs": nan, "cosine": nan, "psnr_db": nan, "finite": False}
    diff = np.abs(ref - out)
    rmse = math.sqrt(float(np.mean(diff**2)))
    peak = float(np.max(np.abs(ref)))
    norms = float(np.linalg.norm(ref) * np.linalg.norm(out))
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "cosine": float(np.sum(ref * out) / norms) if norms > 0 else float(rmse == 0),
        "psnr_db": _psnr(peak, rmse),
        "finite": True,
    }


def image_psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR of 8-bit images (NHWC uint8), peak 255."""
    diff = reference.astype(np.float64) - candidate.astype(np.float64)
    return _psnr(255.0, math.sqrt(float(np.mean(diff**2))))


def image_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """max-abs (in 8-bit levels), image PSNR and SSIM of uint8 NHWC images."""
    diff = np.abs(reference.astype(np.int16) - candidate.astype(np.int16))
    return {
        "max_abs": float(diff.max()),
        "image_psnr_db": image_psnr(reference, candidate),
        "ssim": ssim(reference, candidate),
    }


def ssim(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean SSIM of 8-bit images (NHWC uint8): 7x7 uniform windows, per channel (Wang et al. 2004).

    Written here: no installed library computes it (scikit-image, which matches this definition
    with `win_size=7`, is not a dependency; torchmetrics' default is an 11x11 Gaussian window)."""
    x = reference.astype(np.float64)
    y = candidate.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mean_x, mean_y = _box(x), _box(y)
    var_x = _box(x * x) - mean_x**2
    var_y = _box(y * y) - mean_y**2
    cov = _box(x * y) - mean_x * mean_y
    numerator = (2 * mean_x * mean_y + c1) * (2 * cov + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return float(np.mean(numerator / denominator))


def _box(images: np.ndarray, size: int = 7) -> np.ndarray:
    """Mean over every size x size window of NHWC images (valid positions only)."""
    windows = np.lib.stride_tricks.sliding_window_view(images, (size, size), axis=(1, 2))
    return windows.mean(axis=(-2, -1))


def _psnr(peak: float, rmse: float) -> float:
    if rmse == 0:
        return float("inf")
    if peak == 0:
        return float("-inf")
    return 20 * math.log10(peak / rmse)
