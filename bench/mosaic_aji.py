"""Is accuracy preserved end to end? Slide-level AJI of a mosaic vs per-tile AJI, in ONE run.

Builds a pyramidal slide from annotated nucleus tiles (default: the 16 MoNuSeg/Kumar tiles of
``../shared/data/nuclei/monuseg_kumar`` at 0.25 µm/px, laid out 4 x 4 with their instance masks
as one ground-truth mosaic), runs the whole-slide analysis (``analyse_slide``: tissue mask,
tiling with halos, batched inference, stitching), rasterises the stitched level-0 nucleus polygons
back into a label image and scores it against the mosaic ground truth. The same model is also run
tile by tile (``model.segment``) and scored on the same mosaic. Target: slide-level AJI within
0.01 of the per-tile AJI.

Usage: ``python bench/mosaic_aji.py [--data DIR] [--mpp 0.25] [--grid 4]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=here.parent / "shared" / "data" / "nuclei" / "monuseg_kumar"
    )
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--grid", type=int, default=4, help="tiles per mosaic side")
    parser.add_argument("--nuclei-model", default="default")
    args = parser.parse_args()

    import cv2
    from PIL import Image

    from slidestream.config import RunConfig
    from slidestream.models import score_instances
    from slidestream.pipeline import analyse_slide, load_models
    from slidestream.wsi.synthetic import write_pyramidal_tiff

    ids = sorted(p.stem for p in (args.data / "images").glob("*.png"))[: args.grid**2]
    images = [np.asarray(Image.open(args.data / "images" / f"{i}.png").convert("RGB")) for i in ids]
    masks = [np.asarray(Image.open(args.data / "masks" / f"{i}.png")).astype(np.int64) for i in ids]
    th, tw = min(m.shape[0] for m in masks), min(m.shape[1] for m in masks)
    g = args.grid
    rgb = np.zeros((g * th, g * tw, 3), np.uint8)
    truth = np.zeros((g * th, g * tw), np.int64)
    offset = 0
    for k, (img, m) in enumerate(zip(images, masks, strict=True)):
        r, c = divmod(k, g)
        rgb[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = img[:th, :tw]
        mm = m[:th, :tw]
        truth[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = np.where(mm > 0, mm + offset, 0)
        offset += int(m.max())

    config = RunConfig(
        out_dir=Path(tempfile.mkdtemp(prefix="slidestream-mosaic-")) / "out",
        nuclei_model=args.nuclei_model,
        show_progress=False,
        db_url=None,
        min_tissue_fraction=0.0,
        min_tissue_area_um2=0.0,
    )
    models = load_models(config)
    model = models.nuclei

    # Per tile: the model on each annotated tile on its own.
    t0 = time.perf_counter()
    per_tile = np.zeros_like(truth)
    offset = 0
    tile_ajis = []
    for k, img in enumerate(images):
        r, c = divmod(k, g)
        lab = model.segment(img[:th, :tw], args.mpp).astype(np.int64)
        tile_ajis.append(
            score_instances(truth[r * th : (r + 1) * th, c * tw : (c + 1) * tw], lab).aji
        )
        per_tile[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = np.where(lab > 0, lab + offset, 0)
        offset += int(lab.max())
    tile_s = time.perf_counter() - t0
    s_tile = score_instances(truth, per_tile)

    # Whole slide: the pipeline on the mosaic, polygons rasterised back.
    slide_path = config.out_dir.parent / "mosaic.tif"
    write_pyramidal_tiff(slide_path, rgb, mpp=args.mpp, compression="deflate")
    t0 = time.perf_counter()
    outcome = analyse_slide(slide_path, config, models)
    slide_s = time.perf_counter() - t0
    assert outcome.summary is not None
    with gzip.open(config.out_dir / "mosaic" / "nuclei.geojson.gz", "rt") as fh:
        features = json.load(fh)["features"]
    stitched = np.zeros_like(truth, dtype=np.int32)
    for n, feat in enumerate(features, start=1):
        geom = feat["geometry"]
        rings = geom["coordinates"] if geom["type"] == "Polygon" else geom["coordinates"][0]
        # polygon vertices are pixel-edge coordinates; shift to pixel centres for filling
        pts = np.round(np.asarray(rings[0]) * 16 - 8).astype(np.int32)
        cv2.fillPoly(stitched, [pts], n, shift=4)
    s_slide = score_instances(truth, stitched.astype(np.int64))

    print(
        f"mosaic {g}x{g} tiles of {tw}x{th} px at {args.mpp} µm/px, {int(truth.max())} "
        f"true nuclei; model {model.name} at {model.mpp} µm/px"
    )
    print(
        f"per tile (model.segment):  AJI {s_tile.aji:.4f}  PQ {s_tile.pq:.4f}  "
        f"(mean of per-tile AJI {np.mean(tile_ajis):.4f})  {tile_s:.1f} s"
    )
    print(
        f"whole slide (pipeline):    AJI {s_slide.aji:.4f}  PQ {s_slide.pq:.4f}  "
        f"{len(features)} nuclei  {slide_s:.1f} s"
    )
    print(f"difference slide - tile:   AJI {s_slide.aji - s_tile.aji:+.4f}  (target |d| <= 0.01)")


if __name__ == "__main__":
    main()
