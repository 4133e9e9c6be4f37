"""Refit the shipped fast model's type head alone (segmentation kept) on the v2 training images
with the ``train nuclei-types`` fitter, for a few class-balance settings; write one weights file
per setting for ``bench/nuclei_protocol.py --keys val`` (choose) and then ``--keys test`` (report).

Training nuclei: CoNSeP training tiles and CRCHisto images of the v2 split that are neither
validation nor test keys (the shipped sidecar's ``train.val_keys`` / ``train.test_keys``), each
ground-truth centroid matched to the predicted instance under it or within 3 µm, as
``train nuclei-types`` does on slides.

Usage: ``python research/refit_type_head.py --out /tmp/refit [--balance 0,0.5,1]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from slidestream.models.nuclei._data import KNOWN_DATASET_MPP
from slidestream.models.nuclei._network import TYPE_NAMES
from slidestream.models.nuclei._registry import load_resolved_weights, resolve_nuclei_weights
from slidestream.models.nuclei._type_head import (
    TypeHeadConfig,
    build_typed_network,
    concat_samples,
    fit_type_head,
    nucleus_type_samples,
)
from slidestream.models.nuclei._type_metrics import read_typed_truth
from slidestream.models.nuclei._weights import read_sidecar, save_weights

ROOTS = {"consep_train": "nuclei/consep_train", "crchisto": "nuclei_points/crchisto"}


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=here.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--balance", default="0,0.5,1")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--base", default="fast", help="fast, or accurate (no type head: one is added)")
    args = ap.parse_args()
    found = resolve_nuclei_weights(args.base)
    side = read_sidecar(resolve_nuclei_weights("fast").weights)
    held = set(side["train"]["val_keys"]) | set(side["train"]["test_keys"])
    model = load_resolved_weights(found, "cpu")
    model.tta = False
    cfg = TypeHeadConfig(views=args.views, steps=args.steps)
    parts = []
    t0 = time.perf_counter()
    for ds, rel in ROOTS.items():
        root = args.shared / rel
        truth = read_typed_truth(root / ("points.csv" if ds == "crchisto" else "types.csv"))
        for image in sorted(truth):
            if f"{ds}/{image}" in held:
                continue
            with Image.open(root / "images" / f"{image}.png") as im:
                rgb = np.asarray(im.convert("RGB"))
            table = KNOWN_DATASET_MPP[ds]
            mpp = float(table.get(image, table["*"]))
            t = truth[image]
            parts.append(nucleus_type_samples(model, rgb, mpp, t.xy, t.types, group=0, config=cfg))
    samples = concat_samples(parts, int(model.net.config.features[5]) * 9)
    print(
        f"{samples.n_nuclei} nuclei ({np.bincount(samples.labels, minlength=4).tolist()}), "
        f"{samples.matched.mean():.3f} matched, sampled in {time.perf_counter() - t0:.0f} s"
    )
    base = load_file(str(found.weights))
    init = {
        k.removeprefix("unet.final_conv.types."): v
        for k, v in base.items()
        if k.startswith("unet.final_conv.types.")
    }
    preset = {k: v for k, v in found.preset.items() if k not in ("weights", "architecture")}
    preset.pop("preset", None)
    args.out.mkdir(parents=True, exist_ok=True)
    for b in (float(x) for x in args.balance.split(",")):
        t1 = time.perf_counter()
        fit = fit_type_head(
            samples,
            len(TYPE_NAMES),
            width=found.architecture.type_head_width,
            init=init,
            copy_rows={i: i for i in range(len(TYPE_NAMES))} if init else {},
            config=TypeHeadConfig(views=args.views, steps=args.steps, balance=b),
        )
        net = build_typed_network(base, found.architecture, TYPE_NAMES, fit)
        path = args.out / f"refit-{args.base}-b{b:g}.safetensors"
        save_weights(
            net,
            path,
            {
                "presets": {"default": preset},
                "default": "default",
                "name": path.stem,
                "refit": {"balance": b, "steps": args.steps, "views": args.views},
            },
        )
        print(json.dumps({"balance": b, "loss": fit.loss, "seconds": time.perf_counter() - t1}))


if __name__ == "__main__":
    main()
