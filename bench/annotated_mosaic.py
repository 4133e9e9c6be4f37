"""Learning from annotations, end to end, on two annotated mosaic slides of real tiles.

Builds two pyramidal TIFF mosaics of LC25000 lung tiles (``../shared/data/tissue/
lc25000_lung``): tiles of one class fill 3 x 3-tile blocks, every block gets one hand-drawn-like
QuPath annotation (GeoJSON written as QuPath writes it). Slide A holds the first half of every
class's LC25000-clean groups, slide B the other half (no tile, and no source tile, on both).
Then, printing every figure:

1. ``slidestream train tissue --slides A --annotations A.geojson`` (CV on spatial blocks of A);
2. ``slidestream evaluate tissue --slides B --annotations B.geojson --model MODEL``
   (area-weighted balanced accuracy of the tissue map, only where annotated);
3. ``slidestream run B --tissue-model MODEL`` then ``evaluate tissue --results`` on its
   ``tissue.geojson`` (with --run; includes the nucleus pass, so slower);
4. the tile-level figure of the same data: the same configuration trained on A's tiles with
   ``train_tissue`` and B's tiles classified one by one (``classify_image``);
5. speed: patch sampling (patches/s streamed from A) and training time on ``--speed-patches``
   sampled patches (stride 0.15 patch sides to get that many from A).

Usage::

    python bench/annotated_mosaic.py --work /tmp/mosaic [--run] [--speed-patches 5000]
        [--model-mpp 0.75 --patch-size-px 224 --textons 128 --hidden 128]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

# bench/geojson.py would shadow the geojson package the annotation reader uses.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from slidestream.annotated_mosaic import write_annotated_mosaic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "tissue" / "lc25000_lung"
COLORS = {"lung_aca": (220, 40, 40), "lung_n": (60, 170, 75), "lung_scc": (240, 150, 30)}


def _cli(*args: str) -> str:
    cmd = [sys.executable, "-m", "slidestream", *args]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    print(f"# {' '.join(args[:2])}: {time.perf_counter() - t0:.1f} s", flush=True)
    return res.stdout


def _halves(per_class: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rows = list(csv.DictReader((DATA / "labels.csv").open(encoding="utf-8")))
    a, b = [], []
    for cls in sorted({r["label"] for r in rows}):
        groups = sorted({r["group"] for r in rows if r["label"] == cls})
        half = set(groups[: len(groups) // 2])
        mine = [r for r in rows if r["label"] == cls]
        a += [r for r in mine if r["group"] in half][:per_class]
        b += [r for r in mine if r["group"] not in half][:per_class]
    return a, b


def _tiles(rows: list[dict[str, str]]) -> list[tuple[np.ndarray, str]]:
    return [(np.asarray(Image.open(DATA / r["file"]).convert("RGB")), r["label"]) for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--slide-mpp", type=float, default=0.5)
    ap.add_argument("--per-class", type=int, default=72, help="tiles per class per slide")
    ap.add_argument("--model-mpp", default="0.75")
    ap.add_argument("--patch-size-px", default="224")
    ap.add_argument("--textons", default="128")
    ap.add_argument("--hidden", default="128")
    ap.add_argument("--epochs", default="30")
    ap.add_argument("--views-per-image", default="2")
    ap.add_argument("--run", action="store_true", help="also slidestream run + --results")
    ap.add_argument("--speed-patches", type=int, default=0)
    ap.add_argument("--skip-tiles", action="store_true")
    ap.add_argument("--speed-only", action="store_true", help="build the slides, then only step 5")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    rows_a, rows_b = _halves(args.per_class)
    slides = {}
    for label, rows, seed in (("A", rows_a, 1), ("B", rows_b, 2)):
        m = write_annotated_mosaic(
            work / "slides",
            f"lung_mosaic_{label}",
            _tiles(rows),
            tile_mpp=0.75,
            slide_mpp=args.slide_mpp,
            class_colors=COLORS,
            block_tiles=3,
            blocks_per_row=6,
            seed=seed,
        )
        slides[label] = m
        area = m.dimensions[0] * m.dimensions[1] * (args.slide_mpp / 1000) ** 2
        print(
            f"slide {label}: {m.slide.name} {m.dimensions} px ({area:.1f} mm²), "
            f"{len(m.blocks)} blocks"
        )
    if args.speed_only:
        _speed(slides["A"], args)
        return 0
    arch = [
        "--model-mpp",
        args.model_mpp,
        "--patch-size-px",
        args.patch_size_px,
        "--textons",
        args.textons,
        "--hidden",
        args.hidden,
        "--epochs",
        args.epochs,
        "--views-per-image",
        args.views_per_image,
    ]
    model = work / "model"
    out = _cli(
        "train",
        "tissue",
        "--slides",
        str(slides["A"].slide),
        "--annotations",
        str(slides["A"].geojson),
        "--out",
        str(model),
        "--cv-folds",
        "5",
        "--no-progress",
        *arch,
    )
    print(out.strip())
    res = json.loads(
        _cli(
            "evaluate",
            "tissue",
            "--slides",
            str(slides["B"].slide),
            "--annotations",
            str(slides["B"].geojson),
            "--model",
            str(model),
            "--json",
        )
    )
    print(
        f"slide B, map computed for evaluation: balanced accuracy {res['balanced_accuracy']:.4f}, "
        f"accuracy {res['accuracy']:.4f}, coverage {res['coverage']:.4f}, per class "
        f"{ {k: round(v, 4) for k, v in res['per_class_accuracy'].items()} }, "
        f"dice { {k: round(v, 4) for k, v in res['dice'].items()} }"
    )
    if args.run:
        run_out = work / "run"
        _cli(
            "run",
            str(slides["B"].slide),
            "--tissue-model",
            str(model),
            "--out",
            str(run_out),
            "--no-progress",
            "--force",
        )
        res = json.loads(
            _cli(
                "evaluate",
                "tissue",
                "--slides",
                str(slides["B"].slide),
                "--annotations",
                str(slides["B"].geojson),
                "--results",
                str(run_out),
                "--json",
            )
        )
        geo = json.loads((run_out / slides["B"].slide.stem / "tissue.geojson").read_text())
        names = sorted({f["properties"]["classification"]["name"] for f in geo["features"]})
        print(
            f"slide B, slidestream run tissue.geojson (classes {names}): balanced accuracy "
            f"{res['balanced_accuracy']:.4f}, accuracy {res['accuracy']:.4f}, coverage "
            f"{res['coverage']:.4f}"
        )
    if not args.skip_tiles:
        _tile_level(work, rows_a, rows_b, args)
    if args.speed_patches:
        _speed(slides["A"], args)
    return 0


def _tile_level(
    work: Path, rows_a: list[dict[str, str]], rows_b: list[dict[str, str]], args: argparse.Namespace
) -> None:
    """The same configuration on the same tiles, trained and scored tile by tile."""
    from slidestream.models.tissue import (
        TrainConfig,
        classification_report,
        classify_image,
        load_tissue_model,
        train_tissue,
    )

    data = work / "tiles_A"
    data.mkdir(exist_ok=True)
    with (data / "labels.csv").open("w", encoding="utf-8") as fh:
        fh.write("file,label,group\n")
        for r in rows_a:
            fh.write(f"{DATA / r['file']},{r['label']},{r['group']}\n")
    cfg = TrainConfig(
        spacing_um_px=float(args.model_mpp),
        patch_size_pixels=int(args.patch_size_px),
        textons=int(args.textons),
        hidden=int(args.hidden),
        epochs=int(args.epochs),
        views_per_image=12,
        val_fraction=0.0,
    )
    t0 = time.perf_counter()
    train_tissue(data, work / "tile_model", mpp=0.75, config=cfg)
    model = load_tissue_model(str(work / "tile_model"))
    names = model.class_names
    y = np.array([names.index(r["label"]) for r in rows_b])
    pred = np.array(
        [
            int(
                classify_image(
                    np.asarray(Image.open(DATA / r["file"]).convert("RGB")), 0.75, model
                ).argmax()
            )
            for r in rows_b
        ]
    )
    rep = classification_report(y, pred, names)
    print(
        f"tile level, same tiles (trained on A's {len(rows_a)} tiles, {len(rows_b)} B tiles "
        f"classified whole): balanced accuracy {rep.balanced_accuracy:.4f} "
        f"({time.perf_counter() - t0:.0f} s)"
    )


def _speed(slide: object, args: argparse.Namespace) -> None:
    """Patch sampling rate and training time on ``args.speed_patches`` patches."""
    import torch

    from slidestream.models.tissue import SlidePatches, TrainConfig, train_on_slides
    from slidestream.tiling import PatchSamplingConfig, plan_patches, read_annotations, read_patches
    from slidestream.wsi import open_slide

    m = slide  # MosaicSlide
    per_class = max(1, args.speed_patches // 3)
    for mpp, size in ((float(args.model_mpp), int(args.patch_size_px)), (1.5, 112)):
        sampling = PatchSamplingConfig(
            patch_mpp=mpp, patch_size_px=size, stride=0.15, max_per_class=per_class
        )
        with open_slide(m.slide) as s:  # type: ignore[attr-defined]
            regions = read_annotations(m.geojson, dimensions=s.dimensions).regions()  # type: ignore[attr-defined]
            plan = plan_patches(regions, slide_mpp=s.mpp, dimensions=s.dimensions, config=sampling)
        with open_slide(m.slide) as s:  # type: ignore[attr-defined]  # cold reader: no cached tiles
            t0 = time.perf_counter()
            patches = read_patches(s, plan, sampling)
            dt = time.perf_counter() - t0
        print(
            f"sampling: {len(plan)} patches of {size} px at {mpp} µm/px in {dt:.1f} s = "
            f"{len(plan) / dt:.0f} patches/s"
        )
        cfg = TrainConfig(
            spacing_um_px=mpp,
            patch_size_pixels=size,
            textons=int(args.textons) if size == int(args.patch_size_px) else 32,
            hidden=int(args.hidden) if size == int(args.patch_size_px) else 0,
            epochs=25,
            views_per_image=2,
        )
        bank = SlidePatches(
            slide="A", group="A", patches=patches, labels=plan.labels, class_names=plan.class_names
        )
        t0 = time.perf_counter()
        train_on_slides([bank], config=cfg)
        print(
            f"training on {len(plan)} patches ({size} px at {mpp} µm/px, 2 views each, "
            f"{cfg.epochs} epochs): "
            f"{time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads"
        )


if __name__ == "__main__":
    raise SystemExit(main())
