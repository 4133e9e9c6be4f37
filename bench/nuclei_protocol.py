"""Nuclei v2 protocol figures: score nucleus models on the v2 test images (never trained on,
never used for a choice; ``slidestream.models.nuclei._train.DEFAULT_TEST_KEYS``), or with
``--keys val`` on its validation images (what choices are made on; those figures are optimistic).

Per dataset (each image at its own µm/px, metrics at the image's resolution):

* segmentation (images with masks): mean AJI, PQ, Dice;
* typed nuclei (CoNSeP with ``types.csv``, CRCHisto with ``points.csv``): detection F1 and
  HoVer-Net per-type F1, counts pooled over the dataset's test images. Pairing radius 12 px at
  0.25 µm/px (3 µm) for CoNSeP as in HoVer-Net, 6 px for CRCHisto at 20x as in the held-out check.

Usage::

    python bench/nuclei_protocol.py --model fast --model accurate --model PATH.safetensors \
        [--shared ../shared] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from slidestream.models.nuclei import SHIPPED_WEIGHTS, load_nuclei_model, score_instances
from slidestream.models.nuclei._data import KNOWN_DATASET_MPP
from slidestream.models.nuclei._network import TYPE_NAMES
from slidestream.models.nuclei._train import DEFAULT_TEST_KEYS
from slidestream.models.nuclei._type_metrics import (
    TypedCounts,
    TypedPoints,
    instance_points,
    read_typed_truth,
)
from slidestream.models.nuclei._weights import read_sidecar

_ROOTS = {"crchisto": "nuclei_points/crchisto"}
_RADIUS_PX = {"consep_train": 12.0, "crchisto": 6.0}


def _truth(root: Path, dataset: str) -> dict[str, TypedPoints]:
    path = root / ("points.csv" if dataset == "crchisto" else "types.csv")
    return read_typed_truth(path) if path.is_file() else {}


def evaluate(
    model_name: str, shared: Path, keys: tuple[str, ...] = DEFAULT_TEST_KEYS
) -> dict[str, Any]:
    model = load_nuclei_model(model_name)
    typed = getattr(model, "n_types", 0) > 0
    by_ds: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        ds, image = key.split("/", 1)
        by_ds[ds].append(image)
    out: dict[str, Any] = {"model": model.name}
    t0 = time.perf_counter()
    for ds, images in by_ds.items():
        root = shared / "data" / _ROOTS.get(ds, f"nuclei/{ds}")
        truth = _truth(root, ds)
        counts = TypedCounts(names=TYPE_NAMES)
        seg_scores = []
        for image in images:
            with Image.open(root / "images" / f"{image}.png") as im:
                rgb = np.asarray(im.convert("RGB"))
            table = KNOWN_DATASET_MPP[ds]
            mpp = float(table.get(image, table["*"]))
            if typed:
                labels, types = model.segment_typed(rgb, mpp)  # type: ignore[union-attr]
            else:
                labels, types = model.segment(rgb, mpp), None
            mask = root / "masks" / f"{image}.png"
            if mask.is_file():
                with Image.open(mask) as im:
                    seg_scores.append(score_instances(np.asarray(im, np.int32), labels))
            if image in truth:
                if types is None:  # detection only: every nucleus of one type
                    from slidestream.models.nuclei._types import instance_types

                    zero = np.zeros((len(TYPE_NAMES), *labels.shape), np.float32)
                    zero[0] = 1.0
                    types = instance_types(labels, zero, TYPE_NAMES)
                    gt = TypedPoints(xy=truth[image].xy, types=np.zeros_like(truth[image].types))
                else:
                    gt = truth[image]
                counts.add(gt, instance_points(labels, types), _RADIUS_PX.get(ds, 12.0))
        res: dict[str, Any] = {"n_images": len(images)}
        if seg_scores:
            for k in ("aji", "pq", "dice"):
                vals = [getattr(s, k) for s in seg_scores]
                res[k] = round(float(np.mean(vals)), 4)
                res[f"{k}_sd"] = round(float(np.std(vals)), 4)
        if truth:
            sc = counts.scores()
            keys = sc if typed else ("det_precision", "det_recall", "det_f1", "n_true", "n_pred")
            res.update({k: round(float(sc[k]), 4) for k in keys})
        out[ds] = res
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--keys",
        choices=["test", "val"],
        default="test",
        help="the v2 test images (report) or its validation images (to choose on; optimistic)",
    )
    args = ap.parse_args()
    # the v2 run's validation images (recorded in the shipped sidecar), not its test images
    val = tuple(read_sidecar(SHIPPED_WEIGHTS)["train"]["val_keys"])
    keys = DEFAULT_TEST_KEYS if args.keys == "test" else val
    results = [evaluate(m, args.shared, keys) for m in args.model]
    for r in results:
        print(json.dumps(r))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
