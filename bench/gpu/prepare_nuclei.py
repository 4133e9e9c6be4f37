"""Write the shared nucleus datasets resampled to the training µm/px (common format).

``python bench/gpu/prepare_nuclei.py SRC_DIR OUT_DIR [--mpp 0.5]``: for monuseg_kumar, cpm15 and
gbm40_emory under ``SRC_DIR``, every image/mask pair resampled exactly as
``slidestream train nuclei`` does (``load_sources``), written as lossless PNG with an
``mpp.json`` of the new µm/px, so a training run on ``OUT_DIR`` sees identical pixels. A quarter
of the bytes at 0.5 µm/px (about half at 0.35 µm/px): this is what a device check carries.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from slidestream.models.nuclei._data import load_sources, parse_data_arg

DATASETS = ("monuseg_kumar", "cpm15", "gbm40_emory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--mpp", type=float, default=0.5)
    args = ap.parse_args()
    for name in DATASETS:
        items = load_sources([parse_data_arg(args.src / name)], args.mpp)
        folder = args.out / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        for item in items:
            stem = item.key.split("/", 1)[1]
            if item.labels.max() >= 2**16:
                raise SystemExit(f"{item.key}: more than 65535 nuclei, cannot write uint16 PNG")
            Image.fromarray(item.rgb).save(folder / "images" / f"{stem}.png", optimize=True)
            Image.fromarray(item.labels.astype(np.uint16)).save(folder / "masks" / f"{stem}.png")
        (folder / "mpp.json").write_text(json.dumps({"default": args.mpp}))
        print(f"{name}: {len(items)} images at {args.mpp} µm/px -> {folder}")


if __name__ == "__main__":
    main()
