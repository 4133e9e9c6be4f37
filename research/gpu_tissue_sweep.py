"""Grouped k-fold sweep of TissueNet configurations on one GPU, within a time budget.

For each configuration (fixed-feature baseline, a plain CNN alone, fixed features + residual CNN,
residual CNN alone at two sizes) it trains one model per fold of ``group_kfold`` on the other folds
(learned CNNs with :func:`fit_fast`: device-side augmentation, AdamW + one-cycle, bf16 on CUDA) and
classifies the held-out images exactly as at inference (:func:`classify_image`, with and without
dihedral TTA). It prints one line per configuration, writes ``OUT/sweep.json``, then trains the
best (configuration, TTA) pair on all images and writes a loadable model folder to
``OUT/best-model``.

Budget: epochs of each learned configuration are chosen from a measured step time so that
its folds fit its share of the remaining time; a configuration that cannot get at least
``--min-epochs`` is skipped; time for the final fit is always kept back.

Example (repository root, GPU machine)::

    PYTHONUNBUFFERED=1 python tools/gpu_tissue_sweep.py --data data/lc25000_lung --out sweep \
        --minutes 4
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from slidestream.models.tissue import LUNG_CLASS_MAP, classify_image, load_model_dir
from slidestream.models.tissue._data import group_kfold
from slidestream.models.tissue._fast_train import FastTrainConfig, fit_fast
from slidestream.models.tissue._gpu_augment import (
    AugmentConfig,
    DeviceImages,
    upload_images,
)
from slidestream.models.tissue._metrics import ClassificationReport, classification_report
from slidestream.models.tissue._network import TissueNet
from slidestream.models.tissue._runner import PatchClassifier, save_model
from slidestream.models.tissue._spec import ModelSpec
from slidestream.models.tissue._train import (
    DataSource,
    TrainConfig,
    _feature_bank,
    _fit_bank,
    _load_pool,
    _make_spec,
    _net_kwargs,
    _new_net,
    _Pool,
    _resolve_device,
    bank_fold_probs,
)

T0 = time.perf_counter()
#: Step times measured before training are multiplied by this (other jobs share the GPU).
SAFETY = 1.3


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


@dataclass(frozen=True)
class Candidate:
    """One configuration: ``kind`` ``bank`` (fixed features, head only) or ``fast``."""

    name: str
    kind: str
    train: TrainConfig
    epochs: int = 0  # nominal epochs of a ``fast`` candidate (budget may lower them)
    lr: float = 2e-3


def candidates(patch_px: int, mpp: float, batch: int) -> dict[str, Candidate]:
    """The sweep's configurations (names usable with ``--configs``)."""
    base = TrainConfig(
        patch_size_pixels=patch_px,
        spacing_um_px=mpp,
        tta=True,
        val_fraction=0.0,
        device="auto",
    )
    shipped = replace(
        base,
        epochs=30,
        views_per_image=12,
        textons=128,
        hidden=128,
        batch_size=256,
        samples_per_epoch=2560,
    )
    res32 = {"cnn_channels": (32, 64, 128, 256), "cnn_blocks": 1}
    res16 = {"cnn_channels": (16, 32, 64, 128), "cnn_blocks": 2}
    only = {"fixed_features": False, "textons": 0, "hidden": 0, "dropout": 0.2}
    # plain16: the CNN alone that matched the feature model on the CPU (2026-11-27, session f:
    # 0.942 pooled out-of-fold at 1.5 µm/px / 112 px, 300 epochs); here at the sweep's µm/px
    plain16 = {"cnn_channels": (16, 32, 64, 128), "fixed_features": False, "textons": 0}
    return {
        "plain16": Candidate("plain16", "fast", replace(base, **plain16), epochs=300),  # type: ignore[arg-type]
        "res32": Candidate("res32", "fast", replace(base, **res32, **only), epochs=120),  # type: ignore[arg-type]
        "fixed+res32": Candidate(
            "fixed+res32",
            "fast",
            replace(base, **res32, textons=128, hidden=128, dropout=0.2),  # type: ignore[arg-type]
            epochs=120,
        ),
        "res16x2": Candidate("res16x2", "fast", replace(base, **res16, **only), epochs=120),  # type: ignore[arg-type]
        "baseline": Candidate("baseline", "bank", shipped),
    }


def fast_config(c: Candidate, epochs: int, batch: int, seed: int) -> FastTrainConfig:
    t = c.train
    return FastTrainConfig(
        augment=AugmentConfig(patch_px=t.patch_size_pixels, scale_jitter=0.15),
        epochs=epochs,
        batch_size=batch,
        lr=c.lr,
        seed=seed,
    )


def new_net(c: Candidate, n_classes: int) -> TissueNet:
    return TissueNet(num_classes=n_classes, **_net_kwargs(c.train))


def subset_images(data: DeviceImages, idx: npt.NDArray[np.int64]) -> DeviceImages:
    t = torch.from_numpy(idx)
    return DeviceImages(
        pixels=data.pixels[t.to(data.pixels.device)], sizes=data.sizes[t], scales=data.scales[t]
    )


def step_seconds(c: Candidate, data: DeviceImages, n_classes: int, batch: int) -> float:
    """Measured seconds per training step of candidate ``c``: :func:`fit_fast` itself, run for
    two short epochs (a warm-up, then the timed one; each epoch ends with one host sync)."""
    cuda = data.pixels.device.type == "cuda"
    steps = 5 if cuda else 2  # one-cycle needs >= 2 steps per phase
    ends: list[float] = []

    def on_epoch(_epoch: int, _epochs: int, stats: Mapping[str, float]) -> None:
        ends.append(stats["seconds"])

    cfg = replace(
        fast_config(c, 2, batch, 0), steps_per_epoch=steps, norm_crops=batch, warmup_fraction=0.5
    )
    labels = torch.randint(0, n_classes, (len(data),), generator=torch.Generator().manual_seed(0))
    weights = np.full(len(data), 1.0 / len(data))
    fit_fast(new_net(c, n_classes), data, labels.numpy(), weights, cfg, on_epoch=on_epoch)
    return (ends[1] - ends[0]) / steps


def sync(data: DeviceImages) -> None:
    if data.pixels.device.type == "cuda":
        torch.cuda.synchronize()


def evaluate(
    net: TissueNet, spec: ModelSpec, pool: _Pool, idx: npt.NDArray[np.int64], device: torch.device
) -> dict[bool, npt.NDArray[np.float32]]:
    """Held-out class probabilities as at inference, ``{tta: (len(idx), K)}``."""
    model = PatchClassifier(spec=spec, module=net, device=device)
    out = {}
    for tta in (False, True):
        out[tta] = np.stack(
            [classify_image(pool.images[i], pool.mpps[i], model, tta=tta) for i in idx]
        )
    return out


def report_json(r: ClassificationReport) -> dict[str, Any]:
    return {
        "balanced_accuracy": r.balanced_accuracy,
        "accuracy": r.accuracy,
        "confusion": [list(row) for row in r.confusion],
    }


def run_bank(
    c: Candidate, pool: _Pool, folds: list[npt.NDArray[np.int64]], device: torch.device
) -> dict[str, Any]:
    """The shipped fixed-feature path (as ``cross_validate_tissue``), TTA as configured."""
    cfg = replace(c.train, device=device.type)
    oof = np.zeros((len(pool.images), len(pool.class_names)), dtype=np.float32)
    for va, probs in zip(folds, bank_fold_probs(pool, folds, cfg, device), strict=True):
        oof[va] = probs
    return {"oof": {cfg.tta: oof}, "epochs": cfg.epochs}


class AbandonedError(Exception):
    """The sweep's deadline passed before a configuration finished all its folds."""


def run_fast(
    c: Candidate,
    epochs: int,
    pool: _Pool,
    data: DeviceImages,
    folds: list[npt.NDArray[np.int64]],
    spec: ModelSpec,
    device: torch.device,
    batch: int,
    seed: int,
    deadline: float,
) -> dict[str, Any]:
    """Grouped CV of a learned candidate; raises :class:`AbandonedError` past ``deadline``."""
    k = len(pool.class_names)
    oof = {tta: np.zeros((len(pool.images), k), dtype=np.float32) for tta in (False, True)}
    fold_s, fit_s = [], []
    for f, va in enumerate(folds):
        t = time.perf_counter()
        tr = np.setdiff1d(np.arange(len(pool.images)), va).astype(np.int64)
        cfg = fast_config(c, epochs, batch, seed + f)
        ran = [0]

        def count(epoch: int, _epochs: int, _stats: Any, ran: list[int] = ran) -> None:
            ran[0] = epoch

        net = fit_fast(
            new_net(c, k),
            subset_images(data, tr),
            pool.labels[tr],
            pool.subset(tr).weights(),
            cfg,
            on_epoch=count,
            deadline=deadline,
        )
        if ran[0] < epochs:
            raise AbandonedError(f"{c.name} fold {f + 1}: deadline after {ran[0]}/{epochs} epochs")
        sync(data)
        fit_s.append(time.perf_counter() - t)
        probs = evaluate(net, spec, pool, va, device)
        for tta in (False, True):
            oof[tta][va] = probs[tta]
        fold_s.append(time.perf_counter() - t)
        ba = classification_report(pool.labels[va], probs[True].argmax(1), pool.class_names)
        log(
            f"  {c.name} fold {f + 1}/{len(folds)}: bal.acc (TTA) {ba.balanced_accuracy:.3f} "
            f"in {fold_s[-1]:.1f}s (fit {fit_s[-1]:.1f}s)"
        )
    return {"oof": oof, "epochs": epochs, "fold_seconds": fold_s, "fit_seconds": fit_s}


def summarise(
    oof: npt.NDArray[np.float32], pool: _Pool, folds: list[npt.NDArray[np.int64]]
) -> dict[str, Any]:
    pred = oof.argmax(1)
    per = [
        classification_report(pool.labels[va], pred[va], pool.class_names).balanced_accuracy
        for va in folds
    ]
    pooled = classification_report(pool.labels, pred, pool.class_names)
    return {
        "pooled": report_json(pooled),
        "fold_balanced_accuracy": per,
        "mean": float(np.mean(per)),
        "sd": float(np.std(per, ddof=1)) if len(per) > 1 else 0.0,
    }


def limit_pool(pool: _Pool, limit: int, seed: int) -> _Pool:
    """A class-stratified subset of about ``limit`` images."""
    rng = np.random.default_rng(seed)
    k = len(pool.class_names)
    keep = []
    for c in range(k):
        members = np.flatnonzero(pool.labels == c)
        keep.extend(rng.permutation(members)[: max(2, limit // k)].tolist())
    return pool.subset(np.sort(np.array(keep, dtype=np.int64)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="lc25000_lung folder (labels.csv)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=4.0, help="total wall-clock budget")
    ap.add_argument("--configs", default="plain16,fixed+res32,res32")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mpp", type=float, default=0.75, help="µm/px of the images")
    ap.add_argument("--model-mpp", type=float, default=0.75)
    ap.add_argument("--patch-px", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-epochs", type=int, default=0, help="cap nominal epochs (0: none)")
    ap.add_argument("--epochs", type=int, default=0, help="nominal epochs of learned configs")
    ap.add_argument("--lr", type=float, default=0.0, help="peak lr of learned configs")
    ap.add_argument("--min-epochs", type=int, default=20, help="skip a config below this")
    ap.add_argument("--limit", type=int, default=0, help="use about this many images (smoke)")
    ap.add_argument("--class-map", choices=("lung", "none"), default="lung")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--no-final", action="store_true", help="skip the final fit")
    args = ap.parse_args(argv)

    budget_s = args.minutes * 60.0
    device = _resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    cmap = dict(LUNG_CLASS_MAP) if args.class_map == "lung" else {}
    src = DataSource(data_dir=args.data, mpp=args.mpp, class_map=cmap)
    pool = _load_pool([src], None, args.model_mpp)
    if args.limit:
        pool = limit_pool(pool, args.limit, args.seed)
    k = len(pool.class_names)
    folds = group_kfold(pool.groups, pool.labels, args.folds, seed=args.seed)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor()
    log(
        f"{len(pool.images)} images, classes {pool.class_names}, {args.folds} folds, "
        f"device {device} ({name}), torch {torch.__version__}, budget {budget_s:.0f}s"
    )
    data = upload_images(pool.images, [m / args.model_mpp for m in pool.mpps], device)
    all_cands = candidates(args.patch_px, args.model_mpp, args.batch_size)
    for n, cand in all_cands.items():
        if cand.kind == "fast" and (args.epochs or args.lr):
            all_cands[n] = replace(cand, epochs=args.epochs or cand.epochs, lr=args.lr or cand.lr)
    chosen = [all_cands[n.strip()] for n in args.configs.split(",") if n.strip()]
    oofs: dict[tuple[str, bool], npt.NDArray[np.float32]] = {}
    n_train = len(pool.images) - min(len(f) for f in folds)

    results: dict[str, Any] = {
        "argv": sys.argv,
        "torch": torch.__version__,
        "device": name,
        "n_images": len(pool.images),
        "class_names": list(pool.class_names),
        "configs": {},
    }
    # Time kept back for the final fit: raised to (measured fit time per fold) x (all images /
    # training images) x 1.3 + 15 s, the largest over the configurations run so far.
    final_reserve = 15.0
    end = T0 + budget_s
    fast_left = [x.name for x in chosen if x.kind == "fast"]
    for c in chosen:
        spec = _make_spec(
            c.train,
            pool.class_names,
            name=None,
            display_name=None,
            default_input_mpp=None,
            class_colors=None,
        )
        left = end - time.perf_counter() - final_reserve
        t = time.perf_counter()
        try:
            if c.kind == "bank":
                est = 0.15 * budget_s if device.type == "cuda" else 0.3 * budget_s
                if left < est:
                    log(f"skip {c.name}: {left:.0f}s left, needs ~{est:.0f}s")
                    continue
                res = run_bank(c, pool, folds, device)
            else:
                share = left / max(1, len(fast_left))
                fast_left.remove(c.name)
                if share < 10.0:
                    log(f"skip {c.name}: {share:.0f}s left for it")
                    continue
                step = step_seconds(c, data, k, args.batch_size) * SAFETY
                spe = math.ceil(n_train / args.batch_size)
                spe_all = math.ceil(len(pool.images) / args.batch_size)
                prep = step * 256 / args.batch_size * 0.5 + (3.0 if c.train.textons else 0.5)
                eval_s = (0.03 if device.type == "cuda" else 0.5) * len(pool.images) / args.folds

                rate = (prep, spe, spe_all, step, eval_s, final_reserve)

                def cost(e: int, rate: tuple[float, ...] = rate) -> float:
                    pre, per_epoch, per_epoch_all, sec, ev, reserve = rate
                    cv = args.folds * (pre + e * per_epoch * sec + ev)
                    final = pre + e * per_epoch_all * sec + 10.0
                    return float(cv + max(0.0, final - reserve))

                epochs = min(c.epochs, args.max_epochs or c.epochs)
                while epochs >= args.min_epochs and cost(epochs) > share:
                    epochs = int(epochs * 0.9)
                n_par = sum(p.numel() for p in new_net(c, k).parameters())
                log(
                    f"{c.name}: {n_par:,} params, {step / SAFETY * 1000:.1f} ms/step (batch "
                    f"{args.batch_size}), share {share:.0f}s -> {epochs} epochs (nominal "
                    f"{c.epochs}), est. {cost(epochs):.0f}s"
                )
                if epochs < args.min_epochs:
                    log(f"skip {c.name}: < --min-epochs {args.min_epochs} fit its share")
                    continue
                deadline = end - final_reserve
                res = run_fast(
                    c, epochs, pool, data, folds, spec, device, args.batch_size, args.seed, deadline
                )
                final_reserve = max(
                    final_reserve,
                    float(np.max(res["fit_seconds"])) * len(pool.images) / n_train * 1.3 + 15.0,
                )
        except AbandonedError as exc:
            log(f"abandon {c.name}: {exc}")
            results["abandoned"] = [*results.get("abandoned", []), c.name]
            break
        seconds = time.perf_counter() - t
        entry: dict[str, Any] = {
            "kind": c.kind,
            "arch_args": c.train.arch_args(),
            "epochs": res["epochs"],
            "batch_size": args.batch_size if c.kind == "fast" else c.train.batch_size,
            "lr": c.lr if c.kind == "fast" else c.train.lr,
            "params": sum(p.numel() for p in new_net(c, k).parameters()),
            "seconds": seconds,
            "fold_seconds": res.get("fold_seconds"),
        }
        for tta, oof in res["oof"].items():
            oofs[(c.name, tta)] = oof
            summ = summarise(oof, pool, folds)
            entry["tta" if tta else "no_tta"] = summ
            log(
                f"RESULT {c.name:12s} {'TTA   ' if tta else 'no-TTA'} pooled bal.acc "
                f"{summ['pooled']['balanced_accuracy']:.3f}  folds {summ['mean']:.3f} ± "
                f"{summ['sd']:.3f}  ({seconds:.0f}s, {res['epochs']} epochs)"
            )
        results["configs"][c.name] = entry
        # Information only (not shippable as one network): mean probabilities with the baseline.
        for (other, tta), o_oof in list(oofs.items()):
            if not tta or other == c.name or "baseline" not in (c.name, other):
                continue
            if True not in res["oof"]:
                continue
            ens = summarise((o_oof + res["oof"][True]) / 2, pool, folds)
            results.setdefault("ensembles", {})[f"{other}+{c.name}"] = ens
            log(
                f"ENSEMBLE {other}+{c.name} (TTA, mean probs) pooled bal.acc "
                f"{ens['pooled']['balanced_accuracy']:.3f}  folds {ens['mean']:.3f} ± "
                f"{ens['sd']:.3f}"
            )
        (args.out / "sweep.json").write_text(json.dumps(results, indent=2))

    if not results["configs"]:
        log("no configuration fitted the budget; nothing to fit (raise --minutes)")
        (args.out / "sweep.json").write_text(json.dumps(results, indent=2))
        return 0
    best_name, best_tta, best_ba = "", True, -1.0
    for n, e in results["configs"].items():
        for key, tta in (("tta", True), ("no_tta", False)):
            if key in e and e[key]["pooled"]["balanced_accuracy"] > best_ba + 1e-9:
                best_name, best_tta, best_ba = n, tta, e[key]["pooled"]["balanced_accuracy"]
    results["best"] = {"config": best_name, "tta": best_tta, "pooled_balanced_accuracy": best_ba}
    log(f"best: {best_name} (TTA {best_tta}) pooled bal.acc {best_ba:.3f}")
    (args.out / "sweep.json").write_text(json.dumps(results, indent=2))
    if args.no_final:
        return 0

    c = all_cands[best_name]
    cfg = replace(c.train, tta=best_tta, device=device.type)
    spec = _make_spec(
        cfg,
        pool.class_names,
        name="lung-lc25000",
        display_name="Lung H&E: adenocarcinoma / squamous cell carcinoma / benign (LC25000)",
        default_input_mpp=args.mpp,
        class_colors=None,
    )
    t = time.perf_counter()
    all_idx = np.arange(len(pool.images), dtype=np.int64)
    ran = [0]
    epochs = int(results["configs"][best_name]["epochs"])

    def count(epoch: int, _epochs: int, _stats: Any) -> None:
        ran[0] = epoch

    if c.kind == "bank":
        net = _new_net(pool, cfg, device)
        bank = _feature_bank(net, pool, cfg, device)
        net, _, _ = _fit_bank(net, bank, pool, all_idx, np.zeros(0, dtype=np.int64), cfg, None)
    else:
        net = fit_fast(
            new_net(c, k),
            data,
            pool.labels,
            pool.weights(),
            fast_config(c, epochs, args.batch_size, args.seed),
            on_epoch=count,
            deadline=end - 8.0,
        )
        if ran[0] < epochs:
            log(f"WARNING: final fit cut at {ran[0]}/{epochs} epochs by the budget")
    out_dir = args.out / "best-model"
    net = net.cpu().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    spec = save_model(net, spec, out_dir)
    # Round trip: the written folder must load and agree with the in-memory network.
    loaded = load_model_dir(out_dir, device="cpu")
    mem = PatchClassifier(spec=spec, module=net, device="cpu")
    probe = [pool.images[i] for i in all_idx[:: max(1, len(all_idx) // 4)][:4]]
    diff = max(
        float(
            np.abs(classify_image(im, args.mpp, loaded) - classify_image(im, args.mpp, mem)).max()
        )
        for im in probe
    )
    results["final"] = {
        "model_dir": str(out_dir),
        "weights_sha256": spec.slidestream.get("weights_sha256"),
        "seconds": time.perf_counter() - t,
        "epochs": epochs,
        "epochs_run": ran[0] if c.kind == "fast" else epochs,
        "reload_max_abs_diff": diff,
    }
    (args.out / "sweep.json").write_text(json.dumps(results, indent=2))
    log(
        f"final fit of {best_name} on {len(pool.images)} images: {out_dir} "
        f"({results['final']['seconds']:.0f}s, reload max |dp| {diff:.2e}); "
        f"total {time.perf_counter() - T0:.0f}s of {budget_s:.0f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
