"""``train nuclei-types`` on annotated slides, judged on other slides: the base model's types
(mapped to the user's names) against the fitted head's, in ONE run.

Builds pyramidal mosaic slides from typed public tiles, each with a QuPath GeoJSON in the user's
own vocabulary (QuPath's default class names and colours: ``Tumor`` = epithelial, ``Immune
cells`` = inflammatory, ``Stroma`` = fibroblast/spindle, ``Other``):

* ``crchisto``: CRCHistoPhenotypes points (20x, 0.55 µm/px) as the QuPath *Points* tool stores
  them (one classified MultiPoint annotation per class and tile). Training slides: the
  images of the v2 training split, cut into ``--train-slides`` mosaics (cross-validation by
  slide); test slide: the v2 test images (10), which neither the base model nor the head saw.
* ``consep``: CoNSeP nucleus outlines (40x, 0.25 µm/px) as classified QuPath detections.
  Training: ``train_1..20`` in ``--train-slides`` mosaics; test: ``train_24..27``.

Then runs ``slidestream train nuclei-types`` on the training slides and ``slidestream evaluate
nuclei --slides`` on the test slide with the fitted model and with the base model (its types
mapped by ``--class-map``). The segmentation is the base model's in both, so detection is the
same and only the types differ. CRCHisto does not mark every nucleus, so its detection precision
(and every type F1, which counts unpaired detections) is low for both; the type accuracy over
paired nuclei is the cleaner figure there.

The base model saw the training images (with the 4-type names) in its own training; neither
saw the test images.

Usage: ``python bench/nuclei_types_annotated.py [--dataset crchisto|consep|both]``
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QUPATH = {
    "Tumor": (200, 0, 0),
    "Immune cells": (160, 90, 160),
    "Stroma": (150, 200, 150),
    "Other": (255, 200, 0),
}
"""QuPath's default classes and colours."""

CRCHISTO_NAMES = {
    "epithelial": "Tumor",
    "inflammatory": "Immune cells",
    "fibroblast": "Stroma",
    "others": "Other",
}
CONSEP_NAMES = {
    "epithelial": "Tumor",
    "inflammatory": "Immune cells",
    "spindle": "Stroma",
    "other": "Other",
}
BASE_MAP = "Tumor=epithelial,Immune cells=inflammatory,Stroma=spindle,Other=other"


def _split_keys() -> tuple[set[str], set[str]]:
    here = Path(__file__).resolve().parent.parent
    side = json.loads((here / "models/weights/nuclei-unet.json").read_text())
    return set(side["train"]["val_keys"]), set(side["train"]["test_keys"])


def _crchisto_tiles(root: Path, keys: list[str]) -> list[object]:
    from PIL import Image

    from slidestream.annotated_mosaic import TypedTile

    points: dict[str, list[tuple[float, float, str]]] = {}
    with (root / "points.csv").open() as fh:
        for row in csv.DictReader(fh):
            points.setdefault(row["image"], []).append(
                (float(row["x"]), float(row["y"]), CRCHISTO_NAMES[row["type"]])
            )
    tiles = []
    for key in keys:
        rgb = np.asarray(Image.open(root / "images" / f"{key}.png").convert("RGB"))
        pts = points.get(key, [])
        h, w = rgb.shape[:2]
        pts = [(min(max(x, 0.0), w - 0.01), min(max(y, 0.0), h - 0.01), c) for x, y, c in pts]
        tiles.append(
            TypedTile(
                rgb=rgb,
                xy=np.array([(x, y) for x, y, _ in pts], np.float64).reshape(-1, 2),
                classes=tuple(c for *_, c in pts),
            )
        )
    return tiles


def _consep_tiles(root: Path, keys: list[str]) -> list[object]:
    import cv2
    from PIL import Image
    from scipy import ndimage

    from slidestream.annotated_mosaic import TypedTile

    types: dict[tuple[str, int], str] = {}
    with (root / "types.csv").open() as fh:
        for row in csv.DictReader(fh):
            types[(row["image"], int(row["instance"]))] = CONSEP_NAMES[row["type_name"]]
    tiles = []
    for key in keys:
        rgb = np.asarray(Image.open(root / "images" / f"{key}.png").convert("RGB"))
        mask = np.asarray(Image.open(root / "masks" / f"{key}.png")).astype(np.int32)
        xy, classes, outlines = [], [], []
        for i, sl in enumerate(ndimage.find_objects(mask), start=1):
            if sl is None or (key, i) not in types:
                continue
            sub = (mask[sl] == i).astype(np.uint8)
            contours, _ = cv2.findContours(sub, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            if not contours:
                continue
            c = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float64)
            if len(c) < 3:
                continue
            c += (sl[1].start, sl[0].start)
            rr, cc = np.nonzero(sub)
            xy.append((cc.mean() + sl[1].start, rr.mean() + sl[0].start))
            classes.append(types[(key, i)])
            outlines.append(c + 0.5)  # pixel corners -> pixel-edge outline
        tiles.append(
            TypedTile(
                rgb=rgb,
                xy=np.asarray(xy, np.float64).reshape(-1, 2),
                classes=tuple(classes),
                outlines=tuple(outlines),
            )
        )
    return tiles


def _cli(*args: str) -> tuple[str, float]:
    exe = Path(sys.executable).with_name("slidestream")
    t0 = time.perf_counter()
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"slidestream {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return res.stdout, time.perf_counter() - t0


def _run(name: str, shared: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    from slidestream.annotated_mosaic import write_typed_nuclei_mosaic

    val, test = _split_keys()
    if name == "crchisto":
        root = shared / "nuclei_points" / "crchisto"
        with (root / "labels.csv").open() as fh:
            keys = [r["image"] for r in csv.DictReader(fh)]
        train = [k for k in keys if f"crchisto/{k}" not in val | test]
        held = [k for k in keys if f"crchisto/{k}" in test]
        read, mpp, outlines = _crchisto_tiles, 0.55, False
    else:
        root = shared / "nuclei" / "consep_train"
        train = [f"train_{i}" for i in range(1, 21)]
        held = [f"train_{i}" for i in range(24, 28)]
        read, mpp, outlines = _consep_tiles, 0.25, True
    if args.max_images:
        train, held = train[: args.max_images], held[: args.max_images]
    t0 = time.perf_counter()
    n_slides = max(1, args.train_slides)
    slides = []
    for s in range(n_slides):
        chunk = train[s::n_slides]
        slides.append(
            write_typed_nuclei_mosaic(
                work,
                f"{name}-train{s + 1}",
                read(root, chunk),
                mpp=mpp,  # type: ignore[arg-type]
                class_colors=QUPATH,
                columns=4,
                gap_px=args.gap_px,
                as_outlines=outlines,
            )
        )
    test_slide = write_typed_nuclei_mosaic(
        work,
        f"{name}-test",
        read(root, held),
        mpp=mpp,  # type: ignore[arg-type]
        class_colors=QUPATH,
        columns=4,
        gap_px=args.gap_px,
        as_outlines=outlines,
    )
    t_built = time.perf_counter() - t0
    model_dir = work / f"{name}-model"
    train_args = ["train", "nuclei-types", "--out", str(model_dir), "--base", args.base]
    for sl in slides:
        train_args += ["--slides", str(sl.slide), "--annotations", f"{sl.slide}={sl.geojson}"]
    train_args += ["--steps", str(args.steps), "--views", str(args.views), "--no-progress"]
    train_args += ["--cv-folds", str(n_slides)]
    out, t_train = _cli(*train_args)
    print(out.strip())
    record = json.loads((model_dir / "training.json").read_text())
    ev = [
        "evaluate",
        "nuclei",
        "--slides",
        str(test_slide.slide),
        "--annotations",
        f"{test_slide.slide}={test_slide.geojson}",
        "--json",
    ]
    tuned, t_eval = _cli(*ev, "--model", str(model_dir))
    base, _ = _cli(*ev, "--model", args.base, "--class-map", BASE_MAP)
    tuned_s, base_s = json.loads(tuned)["types"], json.loads(base)["types"]
    n_annotated = sum(s["annotated"] for s in record["slides"])
    return {
        "dataset": name,
        "train_images": len(train),
        "test_images": len(held),
        "train_nuclei": n_annotated,
        "test_nuclei": len(test_slide.classes),
        "matched_fraction": record["matched_fraction"],
        "cv": record["cv"]["summary"] if record["cv"] else None,
        "seconds": {
            "build": t_built,
            "train_cli": t_train,
            "evaluate_cli": t_eval,
            **record["seconds"],
        },
        "nuclei_per_s_sampling": n_annotated / max(record["seconds"]["sampling"], 1e-9),
        "test_base": base_s,
        "test_tuned": tuned_s,
    }


def _table(res: dict[str, object]) -> str:
    base = res["test_base"]
    tuned = res["test_tuned"]
    assert isinstance(base, dict) and isinstance(tuned, dict)
    # the base model's scores are under its own names (f1_epithelial ...): back to the user's
    to_user = {f"f1_{b}": f"f1_{u}" for u, b in (p.split("=") for p in BASE_MAP.split(","))}
    base = {to_user.get(k, k): v for k, v in base.items()}
    keys = ["det_f1", "type_accuracy", *sorted(k for k in tuned if k.startswith("f1_"))]
    head = f"| {res['dataset']} test | " + " | ".join(keys) + " |"
    rows = [head, "|---" * (len(keys) + 1) + "|"]
    for label, sc in (("base (mapped)", base), ("fitted head", tuned)):
        cells = " | ".join(f"{sc.get(k, float('nan')):.3f}" for k in keys)
        rows.append(f"| {label} | {cells} |")
    return "\n".join(rows)


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=here.parent / "shared" / "data")
    parser.add_argument("--dataset", choices=["crchisto", "consep", "both"], default="both")
    parser.add_argument("--base", default="default")
    parser.add_argument("--train-slides", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--max-images", type=int, default=0, help="a quick run: fewer images")
    parser.add_argument("--gap-px", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None, help="keep the slides and models here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    names = ["crchisto", "consep"] if args.dataset == "both" else [args.dataset]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for name in names:
            res = _run(name, args.shared, work, args)
            results.append(res)
            print(
                json.dumps(
                    {k: v for k, v in res.items() if k not in ("test_base", "test_tuned")}, indent=1
                )
            )
            print(_table(res))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
