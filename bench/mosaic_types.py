"""Are nucleus types preserved end to end? Slide-level per-type counts and type F1 of a mosaic
vs the same model tile by tile, in ONE run.

Builds a pyramidal slide from typed annotated tiles (default: the CoNSeP test tiles of the v2
protocol, ``consep_train/train_24..27``, 1000 x 1000 px at 0.25 µm/px, laid out 2 x 2), runs the
whole-slide analysis (``analyse_slide``: tissue mask, tiling with halos, batched inference,
per-nucleus type in the post-processing workers, stitching, writers), and compares

* the per-type nucleus counts of ``summary.json`` with the per-type counts of the model run tile
  by tile (``model.segment_typed`` on each annotated tile on its own), target within 1 %;
* slide-level detection and per-type F1 (HoVer-Net's definitions; centroids and types read back
  from ``nuclei.parquet``) with the tile-level figures against the same typed ground truth
  (``types.csv``), target within 0.01.

Tiles are laid out with a white gutter of ``--gap-px`` level-0 px around each, and the tile pass
runs on each tile with the same white border, so both passes see the same context around every
nucleus (without a gutter the slide pass sees the neighbouring tile across a seam and white
background at the slide's edge, where the tile pass sees only its own tile and the model's
padding; without a gutter that alone changed 3 % of the nucleus count on these CoNSeP tiles).
What remains is what tiling, halos, ownership, per-nucleus typing in the workers and the
writers change, plus bf16 rounding, which differs with the tile layout.

Usage: ``python bench/mosaic_types.py --nuclei-model PATH.safetensors [--data DIR]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_TILES = ("train_24", "train_25", "train_26", "train_27")


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=here.parent / "shared" / "data" / "nuclei" / "consep_train"
    )
    parser.add_argument("--tiles", default=",".join(DEFAULT_TILES))
    parser.add_argument("--mpp", type=float, default=0.25)
    parser.add_argument("--grid", type=int, default=2, help="tiles per mosaic side")
    parser.add_argument(
        "--gap-px", type=int, default=384, help="white gutter around each tile, level-0 px"
    )
    parser.add_argument("--radius-px", type=float, default=12.0, help="pairing radius (HoVer-Net)")
    parser.add_argument("--nuclei-model", default="default")
    parser.add_argument("--halo-um", type=float, default=None, help="nucleus tile halo, µm")
    parser.add_argument(
        "--whole", action="store_true", help="also run the model on the whole mosaic at once"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import pyarrow.parquet as pq
    from PIL import Image

    from slidestream.config import RunConfig
    from slidestream.models.nuclei._type_metrics import (
        TypedCounts,
        TypedPoints,
        instance_points,
        read_typed_truth,
    )
    from slidestream.pipeline import analyse_slide, load_models
    from slidestream.wsi.synthetic import write_pyramidal_tiff

    ids = args.tiles.split(",")
    g = args.grid
    images = [np.asarray(Image.open(args.data / "images" / f"{i}.png").convert("RGB")) for i in ids]
    truth_all = read_typed_truth(args.data / "types.csv")
    th, tw = min(im.shape[0] for im in images), min(im.shape[1] for im in images)
    gap = args.gap_px
    sy, sx = th + gap, tw + gap  # tile pitch
    rgb = np.full((g * sy + gap, g * sx + gap, 3), 255, np.uint8)
    origins = []
    truth_xy, truth_t = [], []
    for k, (name, img) in enumerate(zip(ids, images, strict=True)):
        r, c = divmod(k, g)
        oy, ox = gap + r * sy, gap + c * sx
        origins.append((ox, oy))
        rgb[oy : oy + th, ox : ox + tw] = img[:th, :tw]
        t = truth_all[name]
        inside = (t.xy[:, 0] < tw) & (t.xy[:, 1] < th)
        truth_xy.append(t.xy[inside] + (ox, oy))
        truth_t.append(t.types[inside])
    truth = TypedPoints(xy=np.concatenate(truth_xy), types=np.concatenate(truth_t))

    config = RunConfig(
        out_dir=Path(tempfile.mkdtemp(prefix="slidestream-mosaic-types-")) / "out",
        nuclei_model=args.nuclei_model,
        show_progress=False,
        db_url=None,
        min_tissue_fraction=0.0,
        min_tissue_area_um2=0.0,
    )
    if args.halo_um is not None:
        config = config.with_options(nucleus_halo_um=args.halo_um)
    models = load_models(config)
    model = models.nuclei
    names = tuple(model.type_names)
    if not names:
        raise SystemExit(f"{model.name} has no type head; pass a typing model")

    # Per tile: the model on each annotated tile on its own, centroids in mosaic px.
    t0 = time.perf_counter()
    tile_counts = TypedCounts(names=names)
    tile_types = np.zeros(len(names), np.int64)
    tile_xy, tile_t = [], []
    for k, img in enumerate(images):
        ox, oy = origins[k]
        framed = np.full((th + 2 * gap, tw + 2 * gap, 3), 255, np.uint8)
        framed[gap : gap + th, gap : gap + tw] = img[:th, :tw]
        labels, types = model.segment_typed(framed, args.mpp)
        pts = instance_points(labels, types)
        tile_xy.append(pts.xy + np.array([ox - gap, oy - gap]))
        tile_t.append(pts.types)
        tile_types += np.bincount(pts.types, minlength=len(names))
    per_tile = TypedPoints(xy=np.concatenate(tile_xy), types=np.concatenate(tile_t))
    tile_counts.add(truth, per_tile, args.radius_px)
    tile_s = time.perf_counter() - t0
    if args.whole:
        labels, types = model.segment_typed(rgb, args.mpp)
        whole = instance_points(labels, types)
        whole_counts = TypedCounts(names=names)
        whole_counts.add(truth, whole, args.radius_px)
        w_types = np.bincount(whole.types, minlength=len(names))
        print("whole mosaic at once:", dict(zip(names, w_types.tolist(), strict=True)))
        print("whole mosaic scores:", {k: round(v, 4) for k, v in whole_counts.scores().items()})

    # Whole slide: the pipeline on the mosaic; types and centroids from nuclei.parquet.
    slide_path = config.out_dir.parent / "mosaic.tif"
    write_pyramidal_tiff(slide_path, rgb, mpp=args.mpp, compression="deflate")
    t0 = time.perf_counter()
    outcome = analyse_slide(slide_path, config, models)
    slide_s = time.perf_counter() - t0
    assert outcome.summary is not None
    stats = outcome.summary.statistics
    table = pq.read_table(config.out_dir / "mosaic" / "nuclei.parquet")
    slide_type = np.array([names.index(t) if t else -1 for t in table.column("type").to_pylist()])
    xy = np.stack(
        [table.column("centroid_x").to_numpy(), table.column("centroid_y").to_numpy()], axis=1
    )
    keep = slide_type >= 0
    slide_pts = TypedPoints(xy=xy[keep] - 0.5, types=slide_type[keep])  # level-0 -> pixel index
    slide_counts = TypedCounts(names=names)
    slide_counts.add(truth, slide_pts, args.radius_px)

    summary_types = {n: stats.types[n].nucleus_count for n in names}
    tile_by_type = dict(zip(names, tile_types.tolist(), strict=True))
    ts, ss = tile_counts.scores(), slide_counts.scores()
    print(
        f"mosaic {g}x{g} CoNSeP tiles ({', '.join(ids)}) of {tw}x{th} px at {args.mpp} µm/px "
        f"with {gap} px gutters, "
        f"{len(truth.xy)} typed true nuclei; model {model.name} at {model.mpp} µm/px"
    )
    print(f"{'type':14s} {'tile count':>10s} {'slide count':>11s} {'diff %':>7s}")
    rel = {}
    for n in names:
        a, b = tile_by_type[n], summary_types[n]
        rel[n] = 100.0 * (b - a) / max(1, a)
        print(f"{n:14s} {a:10d} {b:11d} {rel[n]:+7.2f}")
    total_a, total_b = sum(tile_by_type.values()), sum(summary_types.values())
    print(f"{'all':14s} {total_a:10d} {total_b:11d} {100.0 * (total_b - total_a) / total_a:+7.2f}")
    print(f"{'score':14s} {'tile':>10s} {'slide':>11s} {'diff':>7s}")
    keys = ["det_f1", "type_accuracy", *(f"f1_{n}" for n in names)]
    for key in keys:
        print(f"{key:14s} {ts[key]:10.4f} {ss[key]:11.4f} {ss[key] - ts[key]:+7.4f}")
    print(
        f"targets: per-type counts within 1 % (max |d| {max(abs(v) for v in rel.values()):.2f} %), "
        f"type F1 within 0.01 (max |d| "
        f"{max(abs(ss[k] - ts[k]) for k in keys if k.startswith('f1_')):.4f}); "
        f"tile pass {tile_s:.1f} s, slide pass {slide_s:.1f} s"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "tile": ts,
                    "slide": ss,
                    "tile_counts": tile_by_type,
                    "slide_counts": summary_types,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
