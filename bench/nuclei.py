"""Benchmark the nucleus models on this machine: params, MP/s and mm²/s.

For each preset: model forward (fp32 / bf16, contiguous / channels-last), post-processing alone,
a pipeline worker's whole per-tile job (post-processing + measurements + level-0 outlines,
``worker_mp_s_per_process``) and model + post-processing, on CPU (and CUDA when present). MP/s
are megapixels per second at the model's working µm/px; mm²/s = MP/s x mpp² (tissue area per
second).

Usage::

    python bench/nuclei.py [--threads 2] [--tile 512] [--repeats 3] [--json OUT] [--models A,B]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _timeit(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _real_tile(tile: int, mpp: float) -> np.ndarray:
    """A real H&E tile at ``mpp`` µm/px (falls back to noise when shared data is absent).

    The nucleus data folder is ``$SLIDESTREAM_NUCLEI_DATA`` or ``../shared/data/nuclei``.
    """
    import os

    from PIL import Image

    from slidestream.models.nuclei._data import resample_image

    data = Path(
        os.environ.get(
            "SLIDESTREAM_NUCLEI_DATA",
            Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nuclei",
        )
    )
    path = data / "monuseg_kumar" / "images" / "Breast_TCGA-AR-A1AS-01Z-00-DX1.png"
    src_mpp = 0.25
    mpp_table = path.parents[1] / "mpp.json"
    if mpp_table.is_file():
        import json as _json

        src_mpp = float(_json.loads(mpp_table.read_text())["default"])
    if not path.is_file():
        return np.random.default_rng(0).integers(0, 255, (tile, tile, 3), dtype=np.uint8)
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    rgb = resample_image(rgb, src_mpp / mpp)
    reps = (int(np.ceil(tile / rgb.shape[0])), int(np.ceil(tile / rgb.shape[1])), 1)
    return np.tile(rgb, reps)[:tile, :tile].copy()


def bench(
    device: str,
    tile: int,
    repeats: int,
    batch_n: int = 1,
    models: tuple[str, ...] = ("nuclei-unet-fast", "nuclei-unet-accurate"),
) -> list[dict[str, Any]]:
    from slidestream.models.nuclei import ClassicalSegmenter, load_nuclei_model
    from slidestream.models.nuclei._model import NucleusModel

    rows: list[dict[str, Any]] = []
    for name in models:
        base = load_nuclei_model(name, device)
        if not isinstance(base, NucleusModel):
            continue
        mpp = base.mpp
        rgb = _real_tile(tile, mpp)
        one = torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None]
        batch = one.expand(batch_n, -1, -1, -1).contiguous()
        mp = batch_n * tile * tile / 1e6
        row: dict[str, Any] = {
            "model": name,
            "device": device,
            "mpp": mpp,
            "params": base.n_parameters,
            "tile_px": tile,
            "batch": batch_n,
            "tta": base.tta,
            "threads": torch.get_num_threads(),
        }
        precisions = ("fp32", "bf16") if device == "cpu" else ("fp32", "fp16")
        if device == "cpu" and base.precision == "fp32" and base.tta:
            # "auto" chose fp32: bf16 is emulated on this CPU (~0.01 MP/s), and timing 8 TTA
            # passes of it would take tens of minutes and says nothing new (see the fast row)
            precisions = ("fp32",)
        for prec in precisions:
            for cl in (False, True):
                m = load_nuclei_model(name, device, precision=prec)  # type: ignore[arg-type]
                assert isinstance(m, NucleusModel)
                if not cl:
                    m.channels_last = False
                    m.net = m.net.to(memory_format=torch.contiguous_format)
                dt = _timeit(lambda m=m, b=batch: m.predict(b), repeats)
                row[f"forward_{prec}{'_cl' if cl else ''}_mp_s"] = round(mp / dt, 3)
        maps = base.predict(one)[0]
        dt_pp = _timeit(lambda m=base, x=maps: m.postprocess(x), repeats)
        row["postprocess_mp_s_per_process"] = round(tile * tile / 1e6 / dt_pp, 3)
        # what a pipeline worker does per tile: post-processing, then the owned nuclei's
        # measurements and level-0 outlines (the pipeline's own per-tile job, run inline)
        from slidestream.pipeline import submit_nucleus_tile

        def worker(m: Any = base, x: Any = maps, image: Any = rgb) -> Any:
            core = (32, 32, tile - 32, tile - 32)
            return submit_nucleus_tile(None, m.postprocess, x, image, core, (0.0, 0.0), 2.0, m.mpp)

        dt_worker = _timeit(worker, repeats)
        row["worker_mp_s_per_process"] = round(tile * tile / 1e6 / dt_worker, 3)
        # Model on the whole batch + post-processing of every tile in this one process (the
        # pipeline spreads post-processing over a pool; see bench/pipeline.py).
        dt_total = _timeit(
            lambda m=base, b=batch: [m.postprocess(x) for x in m.predict(b)], repeats
        )
        row["precision_used"] = base.precision
        row["total_mp_s"] = round(mp / dt_total, 3)
        row["total_mm2_s"] = round(mp / dt_total * mpp**2, 4)
        row["n_nuclei"] = int(base.postprocess(maps).max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    cl_model = ClassicalSegmenter()
    rgb = _real_tile(tile, cl_model.mpp)
    dt = _timeit(lambda: cl_model.segment_working(rgb), repeats)
    mp = tile * tile / 1e6
    rows.append(
        {
            "model": "classical",
            "device": "cpu",
            "mpp": cl_model.mpp,
            "params": 0,
            "tile_px": tile,
            "total_mp_s": round(mp / dt, 3),
            "total_mm2_s": round(mp / dt * cl_model.mpp**2, 4),
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile", type=int, default=512, help="tile side, px at the model µm/px")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument(
        "--devices", default="auto", help="cpu, cuda or cpu,cuda (auto: cpu, plus cuda if present)"
    )
    parser.add_argument("--cuda-batch", type=int, default=8, help="tiles per batch on CUDA")
    parser.add_argument(
        "--models",
        default="nuclei-unet-fast,nuclei-unet-accurate",
        help="comma-separated registry names or .safetensors paths (e.g. a previous preset's "
        "weights, for a before/after in one run)",
    )
    args = parser.parse_args()
    models = tuple(args.models.split(","))
    torch.set_num_threads(args.threads)
    devices = args.devices.split(",")
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list[dict[str, Any]] = []
    for dev in devices:
        if dev == "cpu":
            rows += bench("cpu", args.tile, args.repeats, models=models)
        else:
            rows += bench(dev, args.tile, args.repeats, batch_n=args.cuda_batch, models=models)
    if args.json:
        with Path(args.json).open("w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
