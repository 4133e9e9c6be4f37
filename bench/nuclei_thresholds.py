"""Grid-search the watershed thresholds of a nucleus preset on the validation images.

This is how the thresholds of a preset whose post-processing differs from the training-time
tuning were chosen (the ``accurate`` preset: 8-view TTA maps, watershed on 2x upsampled maps).
``slidestream train nuclei`` tunes the thresholds of the plain network at its working resolution;
this script tunes any preset the way it is used at inference: ``model.predict`` maps of each
validation image (the ``val_keys`` of the weights' sidecar), post-processed with every threshold
combination and scored at the image's ORIGINAL resolution (labels resampled back with the nearest
neighbour, as ``model.segment`` does).

The images are the validation split of the shipped weights, so the best row is optimistic; prefer
a setting that is good on every dataset over the single best mean.

Usage::

    python bench/nuclei_thresholds.py [--model accurate] [--upsample 2] [--data DIR ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np


def _validation_images(
    sidecar: dict[str, Any], data_dirs: list[Path]
) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """``(key, rgb, true labels, µm/px)`` of every validation image found in ``data_dirs``."""
    from PIL import Image

    from slidestream.models.nuclei._data import parse_data_arg

    sources = {d.name: parse_data_arg(d) for d in data_dirs}
    out = []
    for key in sidecar["train"]["val_keys"]:
        dataset, stem = key.split("/", 1)
        src = sources.get(dataset)
        if src is None or not (src.path / "masks" / f"{stem}.png").is_file():
            continue  # not given, or a points-only image (no masks to score)
        with Image.open(src.path / "images" / f"{stem}.png") as im:
            rgb = np.asarray(im.convert("RGB"))
        with Image.open(src.path / "masks" / f"{stem}.png") as im:
            true = np.asarray(im, np.int32)
        out.append((key, rgb, true, src.mpp_of(stem)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="accurate", help="registry name or .safetensors path")
    parser.add_argument("--upsample", type=int, default=None, help="default: the preset's own")
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nuclei"
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        default=None,
        help="dataset folders (default: the shared monuseg_kumar, cpm15, gbm40_emory and "
        "consep_train)",
    )
    parser.add_argument("--fg", default="0.45,0.5,0.55,0.6,0.65")
    parser.add_argument("--markers", default="0.2,0.25,0.3,0.35,0.4,0.5")
    parser.add_argument("--min-marker", default="1,2,3")
    parser.add_argument("--min-size", default="8,12")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()

    import torch

    from slidestream.models.nuclei import load_nuclei_model, postprocess_maps, score_instances
    from slidestream.models.nuclei._data import resample_image, resample_labels
    from slidestream.models.nuclei._registry import SHIPPED_WEIGHTS
    from slidestream.models.nuclei._weights import read_sidecar

    model = load_nuclei_model(args.model)
    if not hasattr(model, "predict"):
        raise SystemExit(f"{args.model}: not a network preset")
    path = Path(args.model) if args.model.endswith(".safetensors") else SHIPPED_WEIGHTS
    data_dirs = args.data or [
        shared / n for n in ("monuseg_kumar", "cpm15", "gbm40_emory", "consep_train")
    ]
    images = _validation_images(read_sidecar(path), data_dirs)
    if not images:
        raise SystemExit(f"no validation images of {path} found in {data_dirs}")
    if args.upsample is not None:
        model.postprocess_config = dataclasses.replace(
            model.postprocess_config, upsample=args.upsample
        )
    base = model.postprocess_config
    print(f"{model.name}: {len(images)} validation images; watershed at {base.upsample}x")
    cases = []
    for key, rgb, true, mpp in images:
        t_img = resample_image(rgb, mpp / model.mpp)
        batch = torch.from_numpy(np.ascontiguousarray(t_img.transpose(2, 0, 1)))[None]
        maps = model.predict(batch)[0]
        u = model.upsample_for(mpp)  # as ``segment`` does
        cases.append((key.split("/")[0], maps, true, u))

    def floats(text: str) -> list[float]:
        return [float(v) for v in text.split(",")]

    rows = []
    grid = itertools.product(
        floats(args.fg), floats(args.markers), floats(args.min_marker), floats(args.min_size)
    )
    for fg, mk, mm, ms in grid:
        cfg = dataclasses.replace(
            base, fg_threshold=fg, marker_threshold=mk, min_marker_px=int(mm), min_size_px=int(ms)
        )
        per_set: dict[str, list[tuple[float, float]]] = {}
        for dataset, maps, true, u in cases:
            labels = postprocess_maps(maps, config=dataclasses.replace(cfg, upsample=u))
            pred = resample_labels(labels, (true.shape[1], true.shape[0]))
            s = score_instances(true, pred)
            per_set.setdefault(dataset, []).append((s.aji, s.pq))
        mean_aji = float(np.mean([a for v in per_set.values() for a, _ in v]))
        rows.append((mean_aji, (fg, mk, int(mm), int(ms)), per_set))
    rows.sort(key=lambda r: r[0], reverse=True)
    print("fg    markers min_marker min_size | AJI / PQ per dataset | mean AJI")
    for mean_aji, (fg, mk, mm, ms), per_set in rows[: args.top]:
        sets = "  ".join(
            f"{d}: {np.mean([a for a, _ in v]):.3f} / {np.mean([p for _, p in v]):.3f}"
            for d, v in per_set.items()
        )
        print(f"{fg:<5} {mk:<7} {mm:<10} {ms:<8} | {sets} | {mean_aji:.4f}")


if __name__ == "__main__":
    main()
