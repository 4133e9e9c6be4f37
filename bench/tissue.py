"""Throughput of the default tissue classifier: patches/s and mm²/s of slide area.

Usage::

    python bench/tissue.py [--model default] [--threads N] [--batch 64] [--seconds 5]

Prints one line per device / option set (fp32, channels-last, bf16 autocast). Slide area per
patch = (patch_size_pixels * spacing_um_px)² µm². Compare with the nucleus model, which works at
0.25-0.5 µm/px at ~1-3 MP/s (≈ 0.06-0.75 mm²/s).
"""

from __future__ import annotations

import argparse
import time

import torch

from slidestream.models.tissue import load_tissue_model


def _bench(
    model_name: str, device: str, batch: int, seconds: float, *, bf16: bool, channels_last: bool
) -> tuple[float, float]:
    model = load_tissue_model(model_name, device)
    model.configure(batch_size=batch, bf16=bf16, channels_last=channels_last)
    s = model.spec.patch_size_pixels
    x = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8)
    model.predict_proba(x)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.predict_proba(x)
        n += batch
    if device == "cuda":
        torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    mm2_per_patch = (s * model.spec.spacing_um_px / 1000.0) ** 2
    return rate, rate * mm2_per_patch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_tissue_model(args.model)
    spec = model.spec
    print(
        f"model {model.name}: {spec.patch_size_pixels} px at {spec.spacing_um_px} µm/px "
        f"({spec.patch_extent_um:.0f} µm), classes {list(spec.class_names)}; "
        f"torch threads {torch.get_num_threads()}"
    )
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for bf16, cl in ((False, False), (False, True), (True, False)):
            rate, mm2 = _bench(
                args.model, dev, args.batch, args.seconds, bf16=bf16, channels_last=cl
            )
            opts = "bf16" if bf16 else ("channels_last" if cl else "fp32")
            print(f"{dev:<5} {opts:<14} {rate:9.1f} patches/s  {mm2:8.3f} mm²/s")


if __name__ == "__main__":
    main()
