"""Is accuracy preserved end to end? Slide-level AJI of a mosaic vs per-tile AJI, in ONE run.

Builds a pyramidal slide from annotated nucleus tiles (default: the 16 MoNuSeg/Kumar tiles of
``../shared/data/nuclei/monuseg_kumar`` at 0.25 µm/px, laid out 4 x 4 with their instance masks
as one ground-truth mosaic), runs the whole-slide analysis (``analyse_slide``: tissue mask,
tiling with halos, batched inference, stitching), rasterises the stitched level-0 nucleus polygons
back into a label image and scores it against the mosaic ground truth. The same model is also run
tile by tile (``model.segment``) and scored on the same mosaic. Target: slide-level AJI within
0.01 of the per-tile AJI.

Rasterisation follows QuPath's frame: level-0 pixel ``(c, r)`` covers ``[c, c + 1) x [r, r + 1)``
and belongs to a polygon when its centre ``(c + 0.5, r + 0.5)`` lies inside. (``cv2.fillPoly``
also fills pixels whose centre is on the boundary; on pixel-edge outlines that grows every
nucleus by a pixel on two sides and cost 0.02 AJI.) A convention check sends the ground truth,
downsampled to the model's resolution, through the same polygon path: it must give back the
nearest-neighbour upsampled label map exactly (AJI 1).

Usage: ``python bench/mosaic_aji.py [--data DIR] [--mpp 0.25] [--grid 4]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt


def rasterise(
    rings: list[npt.NDArray[np.float64]], shape: tuple[int, int]
) -> npt.NDArray[np.int64]:
    """Label image (1..n in ring order) of level-0 polygon rings, pixel-centre rule."""
    from skimage.draw import polygon

    out = np.zeros(shape, np.int64)
    for n, ring in enumerate(rings, start=1):
        rr, cc = polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape)  # edges -> index frame
        out[rr, cc] = n
    return out


def cheap_measure(
    labels: npt.NDArray[np.int32], rgb: npt.NDArray[np.uint8], mpp: float
) -> dict[str, npt.NDArray[np.float64]]:
    """Label ids and centroids only (all ``extract_tile_nuclei`` needs)."""
    from scipy import ndimage

    ids = np.unique(labels)
    ids = ids[ids > 0]
    cyx = np.asarray(ndimage.center_of_mass(np.ones_like(labels), labels, ids)).reshape(-1, 2)
    return {"label": ids.astype(np.float64), "centroid_x": cyx[:, 1], "centroid_y": cyx[:, 0]}


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
    from slidestream.overlays import extract_tile_nuclei
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
    rings = [
        np.asarray(
            (f["geometry"]["coordinates"] if f["geometry"]["type"] == "Polygon"
             else f["geometry"]["coordinates"][0])[0],
            np.float64,
        )
        for f in features
    ]  # fmt: skip
    stitched = rasterise(rings, truth.shape)
    s_slide = score_instances(truth, stitched)

    # Convention check: ground truth at the model's µm/px -> polygons -> level 0 -> raster.
    scale = model.mpp / args.mpp
    m_size = (round(truth.shape[1] / scale), round(truth.shape[0] / scale))
    m_truth = cv2.resize(truth.astype(np.int32), m_size, interpolation=cv2.INTER_NEAREST_EXACT)
    up = cv2.resize(m_truth, truth.shape[::-1], interpolation=cv2.INTER_NEAREST_EXACT)
    # one "tile" without a halo: nuclei on the mosaic's border would be reported as truncated
    logging.getLogger("slidestream.overlays._stitch").setLevel(logging.ERROR)
    table = extract_tile_nuclei(
        m_truth, np.zeros((*m_truth.shape, 3), np.uint8), core=(0, 0, *m_size),
        l0_origin=(0.0, 0.0), l0_per_px=truth.shape[1] / m_size[0], mpp=model.mpp,
        measure=cheap_measure,
    )  # fmt: skip
    round_trip = rasterise(
        [table.coords[a:b] for a, b in zip(table.offsets[:-1], table.offsets[1:], strict=True)],
        truth.shape,
    )
    check_aji = score_instances(up.astype(np.int64), round_trip).aji

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
    print(
        f"convention check: truth at {model.mpp} µm/px -> polygons -> raster vs nearest-upsampled "
        f"AJI {check_aji:.4f} (expect 1)"
    )


if __name__ == "__main__":
    main()
