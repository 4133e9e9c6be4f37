"""Group k-fold CV of a lung-lc25000 ensemble candidate: each member alone, their weighted means.

Usage::

    python bench/tissue_ensemble_cv.py --data ../shared/data/tissue/lc25000_lung \\
        [--cache DIR] [--folds 5] [--threads 2]

Members (see the lung card, "A CNN alone after the fix"):

* ``features``: the recipe of the shipped ``lung-lc25000`` model -- fixed colour/texture front
  end (128 textons) + one-hidden-layer head, 224 px at 0.75 µm/px, 12 augmented views per image;
* ``cnn``: a plain 4-stage CNN (16-32-64-128) alone, 112 px at 1.5 µm/px, 300 epochs of 448
  device-side augmented crops (AdamW + one-cycle).

Their average did not beat ``features`` alone (2026-11-27), so the shipped model is not an
ensemble; this benchmark is how a stronger CNN would be checked before ``slidestream models
ensemble`` ships it.

Every member is cross-validated on the same group folds (``group_kfold``, seed 0) with
:func:`out_of_fold_probabilities`: each image is classified with dihedral TTA by the model of
the fold that held it out. The ensemble's out-of-fold probabilities are the weighted means of
the members', exactly what ``slidestream models ensemble`` computes at inference. Member
probabilities are cached in ``--cache`` (``<member>.npz``, keyed by the configuration) because
the CNN takes about 6 min per fold on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from slidestream.models.tissue import (
    LUNG_CLASS_MAP,
    DataSource,
    OutOfFold,
    TrainConfig,
    classification_report,
    out_of_fold_probabilities,
)

MEMBERS: dict[str, TrainConfig] = {
    "features": TrainConfig(
        epochs=30,
        views_per_image=12,
        textons=128,
        hidden=128,
        batch_size=256,
        samples_per_epoch=2560,
        val_fraction=0.0,
        seed=0,
        device="cpu",
        spacing_um_px=0.75,
        patch_size_pixels=224,
        tta=True,
    ),
    "cnn": TrainConfig(
        epochs=300,
        batch_size=64,
        samples_per_epoch=448,
        lr=2e-3,
        weight_decay=0.05,
        cnn_channels=(16, 32, 64, 128),
        fixed_features=False,
        textons=0,
        val_fraction=0.0,
        seed=0,
        device="cpu",
        spacing_um_px=1.5,
        patch_size_pixels=112,
        tta=True,
    ),
}
#: Weight of the ``cnn`` member (the ``features`` member gets the rest).
CNN_WEIGHTS = (0.0, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 1.0)


def _key(cfg: TrainConfig, data: Path, folds: int) -> str:
    text = json.dumps({"cfg": asdict(cfg), "data": str(data), "folds": folds}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _member_probs(
    name: str, cfg: TrainConfig, source: DataSource, folds: int, cache: Path | None
) -> OutOfFold:
    key = _key(cfg, source.data_dir, folds)
    path = cache / f"{name}.npz" if cache else None
    if path is not None and path.is_file():
        saved = np.load(path)
        if str(saved["key"]) == key:
            print(f"{name}: cached out-of-fold probabilities ({path})")
            classes = tuple(str(c) for c in saved["class_names"])
            return OutOfFold(saved["labels"], saved["probs"], classes, saved["fold"])
    t0 = time.perf_counter()
    oof = out_of_fold_probabilities([source], n_folds=folds, config=cfg)
    print(f"{name}: {folds}-fold CV in {time.perf_counter() - t0:.0f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, key=key, **oof._asdict())
    return oof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="LC25000 lung folder")
    ap.add_argument("--mpp", type=float, default=0.75, help="µm/px of the images")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=None, help="folder for member probabilities")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = DataSource(data_dir=args.data, mpp=args.mpp, class_map=dict(LUNG_CLASS_MAP))
    oof = {
        name: _member_probs(name, cfg, source, args.folds, args.cache)
        for name, cfg in MEMBERS.items()
    }
    labels, _, classes, fold = oof["features"]  # the same for every member
    fold_idx = [np.flatnonzero(fold == k) for k in range(args.folds)]
    print("\n| cnn weight | pooled balanced acc | fold mean ± sd | per fold |\n|---|---|---|---|")
    for w in CNN_WEIGHTS:
        p = (1.0 - w) * oof["features"].probs + w * oof["cnn"].probs
        pooled = classification_report(labels, p.argmax(1), classes).balanced_accuracy
        per = [
            classification_report(labels[va], p[va].argmax(1), classes).balanced_accuracy
            for va in fold_idx
        ]
        print(
            f"| {w:.2f} | {pooled:.4f} | {np.mean(per):.4f} ± {np.std(per, ddof=1):.4f} | "
            + ", ".join(f"{a:.3f}" for a in per)
            + " |"
        )


if __name__ == "__main__":
    main()
