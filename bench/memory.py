"""Peak resident memory of ``slidestream run`` on a synthetic slide with >= 1,000,000 nuclei.

Target (issue #5): peak resident memory stays under 3 GB on a synthetic slide with at least
1,000,000 nuclei.

1. Generates (streamed, never in memory) a pyramidal JPEG slide at ``--mpp`` µm/px (default 0.5)
   whose tissue is densely packed with haematoxylin-dark elliptical nuclei (equivalent diameter
   5-8.5 µm) on a pink eosin background: nuclei sit on a jittered square grid of pitch
   ``--spacing-um`` (default 12.5 µm, 6,400 nuclei per mm² of tissue) defined in level-0
   coordinates, and every random choice is a hash of the grid cell, so tiles agree at their
   borders. Tissue is a wavy superellipse covering ~71 % of the slide. The slide size is chosen
   so that at least ``--nuclei`` grid cells fall inside the tissue (the expected count).
2. Runs the real analysis through the CLI in a child process:
   ``slidestream run SLIDE --out DIR --nuclei-model MODEL --force --no-progress`` (default tissue
   model, statistics database in ``DIR``).
3. Prints the slide size, tissue mm², the nucleus count written (``summary.json`` statistics),
   wall time and per-stage timings (``provenance.timings_s``) and the peak resident memory of the
   main process and of the whole process tree (main + tile readers + post-processing pool):

   * sampled every ``--interval-s`` (0.5 s) with psutil (``/proc`` without it): max RSS of the
     main process, max of the summed RSS of the main process and all its descendants, and
     (every 4th sample) the max summed PSS, which counts shared pages once;
   * ``getrusage(RUSAGE_SELF).ru_maxrss`` of the CLI process and ``RUSAGE_CHILDREN`` (the largest
     single child it has reaped), reported by the child at exit.

   Memory is in decimal units (1 GB = 10^9 bytes). ``--trace CSV`` keeps every sample (with the
   RSS of each process) and ``--verbose`` passes ``-v`` for a time-stamped log, to find which
   stage a peak belongs to.

Usage::

    python bench/memory.py --nuclei 20000                     # quick check
    nohup nice -n 5 python bench/memory.py --nuclei 1000000 --work-dir /tmp/mem1m \\
        > /tmp/mem1m.log 2>&1 &
    python bench/memory.py --nuclei 1000000 --nuclei-model default
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import math
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

TARGET_BYTES = 3_000_000_000  # 3 GB (decimal; every figure here is in 10^6 or 10^9 bytes)
_CLI_CHILD = "--cli-child"

# Ruifrok & Johnston stain vectors (haematoxylin, eosin, residual), RGB order, unit length.
_H_VEC = np.array([0.650, 0.704, 0.286], np.float32)
_E_VEC = np.array([0.072, 0.990, 0.105], np.float32)
_RES_VEC = np.array([0.268, 0.570, 0.776], np.float32)


# ----------------------------------------------------------------------------- synthetic slide


def _hash_uniform(
    i: npt.NDArray[np.int64], j: npt.NDArray[np.int64], salt: int
) -> npt.NDArray[np.float64]:
    """Uniform [0, 1) per grid cell ``(i, j)`` and ``salt`` (splitmix64 finaliser)."""
    z = (i.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
        j.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    )
    z = z + np.uint64((salt * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@functools.lru_cache(maxsize=2)
def _noise_bank(seed: int) -> npt.NDArray[np.float32]:
    """Standard normal noise ``(2048, 2048, 3)`` float32; tiles take random windows of it."""
    return np.random.default_rng(seed).standard_normal((2048, 2048, 3), dtype=np.float32)


@dataclass(frozen=True, slots=True, kw_only=True)
class NucleusSlide:
    """Geometry of the synthetic nucleus-dense slide (all positions level-0 px ``(x, y)``).

    Attributes
    ----------
    width_px, height_px
        Level-0 size in px.
    mpp
        Level-0 µm/px.
    spacing_um
        Pitch of the nucleus grid in µm (one nucleus per cell whose centre is in tissue).
    seed
        Salt of every per-cell random choice.
    """

    width_px: int
    height_px: int
    mpp: float = 0.5
    spacing_um: float = 12.5
    seed: int = 5

    @property
    def spacing_px(self) -> float:
        """Grid pitch in level-0 px."""
        return self.spacing_um / self.mpp

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Grid cells ``(columns, rows)`` covering the slide."""
        s = self.spacing_px
        return math.ceil(self.width_px / s), math.ceil(self.height_px / s)

    def in_tissue(
        self, l0_x: npt.NDArray[np.float64], l0_y: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.bool_]:
        """Whether level-0 points ``(x, y)`` lie in the tissue (a wavy superellipse)."""
        u = (l0_x - self.width_px / 2) / (0.47 * self.width_px)
        v = (l0_y - self.height_px / 2) / (0.47 * self.height_px)
        r = np.sqrt(np.sqrt(u**4 + v**4))
        theta = np.arctan2(v, u)
        edge = 1.0 - 0.04 * (1 + np.sin(5 * theta)) - 0.03 * (1 + np.sin(9 * theta + 1.0))
        return np.asarray(r < edge)

    def _tissue_pixels(
        self, l0_x: int, l0_y: int, width: int, height: int
    ) -> npt.NDArray[np.bool_]:
        """:meth:`in_tissue` at the pixel centres of a level-0 rectangle, ``(height, width)``.

        Tested first on a grid every 8 px: a rectangle wholly in or out of the tissue (all but
        the few along its smooth outline) is filled without evaluating every pixel.
        """
        xs = np.append(np.arange(l0_x, l0_x + width, 8), l0_x + width - 1) + 0.5
        ys = np.append(np.arange(l0_y, l0_y + height, 8), l0_y + height - 1) + 0.5
        coarse = self.in_tissue(*np.meshgrid(xs, ys))
        if coarse.all() or not coarse.any():
            return np.full((height, width), bool(coarse[0, 0]))
        gx, gy = np.meshgrid(
            np.arange(l0_x, l0_x + width) + 0.5, np.arange(l0_y, l0_y + height) + 0.5
        )
        return self.in_tissue(gx, gy)

    def nuclei(
        self, l0_x0: float, l0_y0: float, l0_x1: float, l0_y1: float
    ) -> dict[str, npt.NDArray[np.float64]]:
        """Nuclei whose centre lies in ``[x0, x1) x [y0, y1)`` (level-0 px), tissue only.

        Returns
        -------
        dict
            ``x``, ``y`` (centre, level-0 px), ``a``, ``b`` (semi-axes, px), ``angle`` (degrees)
            and ``od`` (haematoxylin optical density), each ``(N,)`` float64.
        """
        s = self.spacing_px
        n_cols, n_rows = self.grid_shape
        i0 = max(0, math.floor(l0_x0 / s) - 1)
        j0 = max(0, math.floor(l0_y0 / s) - 1)
        i1 = max(i0, min(n_cols, math.floor(l0_x1 / s) + 2))
        j1 = max(j0, min(n_rows, math.floor(l0_y1 / s) + 2))
        jj, ii = np.mgrid[j0:j1, i0:i1].astype(np.int64)
        i, j = ii.ravel(), jj.ravel()
        jitter = 1.75 / self.mpp
        x = (i + 0.5) * s + jitter * (2 * _hash_uniform(i, j, self.seed) - 1)
        y = (j + 0.5) * s + jitter * (2 * _hash_uniform(i, j, self.seed + 1) - 1)
        keep = (x >= l0_x0) & (x < l0_x1) & (y >= l0_y0) & (y < l0_y1)
        keep &= self.in_tissue(x, y)
        i, j, x, y = i[keep], j[keep], x[keep], y[keep]
        radius = (5.0 + 3.5 * _hash_uniform(i, j, self.seed + 2)) / 2 / self.mpp
        elong = np.sqrt(1.0 + 0.3 * _hash_uniform(i, j, self.seed + 3))
        return {
            "x": x,
            "y": y,
            "a": radius * elong,
            "b": radius / elong,
            "angle": 180.0 * _hash_uniform(i, j, self.seed + 4),
            "od": 0.9 + 0.4 * _hash_uniform(i, j, self.seed + 5),
        }

    def expected_count(self) -> int:
        """Nuclei on the slide (grid cells whose jittered centre is in tissue)."""
        total = 0
        step = 4096 * self.spacing_px  # in bands, to bound memory
        for y0 in np.arange(0.0, self.height_px + step, step):
            total += len(self.nuclei(0.0, float(y0), float(self.width_px), float(y0 + step))["x"])
        return total

    def tile(self, l0_x: int, l0_y: int, width: int, height: int) -> npt.NDArray[np.uint8]:
        """RGB uint8 ``(height, width, 3)`` of the level-0 rectangle at ``(l0_x, l0_y)``."""
        import cv2

        max_a = 8.5 / 2 * math.sqrt(1.3) / self.mpp
        blur_sigma = 0.35 / self.mpp
        pad = math.ceil(max_a + 3 * blur_sigma) + 1
        nuc = self.nuclei(l0_x - pad, l0_y - pad, l0_x + width + pad, l0_y + height + pad)
        h_od = np.zeros((height + 2 * pad, width + 2 * pad), np.float32)
        shift = 4
        f = 1 << shift
        for x, y, a, b, ang, od in zip(
            *(nuc[k].tolist() for k in ("x", "y", "a", "b", "angle", "od")), strict=True
        ):
            centre = (round((x - l0_x + pad) * f), round((y - l0_y + pad) * f))
            axes = (round(a * f), round(b * f))
            cv2.ellipse(h_od, centre, axes, ang, 0, 360, od, -1, cv2.LINE_AA, shift)
        h_od = cv2.GaussianBlur(h_od, (0, 0), sigmaX=blur_sigma)[pad:-pad, pad:-pad]
        tissue = self._tissue_pixels(l0_x, l0_y, width, height)
        # eosin texture: sums of separable sinusoids of the level-0 position (µm)
        um_x = (np.arange(l0_x, l0_x + width) * self.mpp).astype(np.float32)
        um_y = (np.arange(l0_y, l0_y + height) * self.mpp).astype(np.float32)
        e_od = 0.5 + 0.08 * np.outer(np.cos(um_y / 55.0), np.sin(um_x / 40.0))
        e_od += 0.05 * (
            np.outer(np.cos(um_y / 9.0), np.sin(um_x / 9.0))
            + np.outer(np.sin(um_y / 9.0), np.cos(um_x / 9.0))
        )
        rng = np.random.default_rng([self.seed, l0_x, l0_y])
        bank = _noise_bank(self.seed)
        oy, ox = rng.integers(0, bank.shape[0] - height), rng.integers(0, bank.shape[1] - width)
        noise = bank[oy : oy + height, ox : ox + width]
        chromatin = 1.0 + 0.15 * noise[..., 0]
        h_tot = np.where(tissue, 0.05 + h_od * chromatin, 0.0).astype(np.float32)
        e_tot = np.where(tissue, e_od, 0.0).astype(np.float32)
        od = h_tot[..., None] * _H_VEC + e_tot[..., None] * _E_VEC + 0.02 * _RES_VEC
        rgb = 255.0 * np.exp(-od)
        rgb += 2.0 * noise[..., ::-1]
        return np.clip(rgb, 0, 255).astype(np.uint8)


def size_for(n_nuclei: int, *, mpp: float, spacing_um: float) -> NucleusSlide:
    """The smallest 4:3 slide (to ~1 %) with at least ``n_nuclei`` nuclei in its tissue."""
    tissue_fraction = 0.71
    area_px2 = n_nuclei * (spacing_um / mpp) ** 2 / tissue_fraction
    scale = 1.0
    while True:
        w = math.ceil(math.sqrt(area_px2 * 4 / 3) * scale / 256) * 256
        h = math.ceil(w * 3 / 4 / 256) * 256
        spec = NucleusSlide(width_px=w, height_px=h, mpp=mpp, spacing_um=spacing_um)
        if spec.expected_count() >= n_nuclei:
            return spec
        scale *= 1.01


# ----------------------------------------------------------------------------- memory sampling


def _descendants_proc(pid: int) -> list[int]:
    """Descendant pids of ``pid`` from ``/proc`` (fallback without psutil)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.extend(kids)
        frontier.extend(kids)
    return out


def _rss_proc(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _role(cmdline: list[str], child_of_main: bool) -> str:
    """A short name for a descendant of the CLI process, from its command line."""
    text = " ".join(cmdline)
    if "resource_tracker" in text:
        return "resource-tracker"
    if "forkserver" in text:
        return "forkserver" if child_of_main else "tile-reader"
    if "spawn_main" in text:
        return "postprocess-worker"
    return (cmdline[0] if cmdline else "?").rsplit("/", 1)[-1]


class TreeSampler:
    """Samples the resident memory of a process and all its descendants in a thread.

    Parameters
    ----------
    pid
        The main process.
    interval_s
        Seconds between samples.
    pss_every
        Also sum PSS (proportional set size, shared pages split) every this many samples
        (psutil only; 0 disables).
    trace
        Optional CSV: one row per sample, ``elapsed_s,main_mb,tree_mb,processes,breakdown``.
    """

    def __init__(
        self,
        pid: int,
        *,
        interval_s: float = 0.5,
        pss_every: int = 4,
        trace: Path | None = None,
    ) -> None:
        self.pid = pid
        self.trace = trace
        self.interval_s = interval_s
        self.pss_every = pss_every
        self.peak_main = 0
        self.peak_tree = 0
        self.peak_tree_pss = 0
        self.peak_breakdown: list[tuple[str, int]] = []
        self.max_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample_psutil(self, with_pss: bool) -> tuple[int, list[tuple[str, int]], int]:
        import psutil

        try:
            main = psutil.Process(self.pid)
            procs = [main, *main.children(recursive=True)]
        except psutil.Error:
            return 0, [], 0
        rows: list[tuple[str, int]] = []
        pss = 0
        for p in procs:
            try:
                rss = int(p.memory_info().rss)
                if with_pss:
                    pss += int(getattr(p.memory_full_info(), "pss", 0))
                name = "main" if p.pid == self.pid else _role(p.cmdline(), p.ppid() == self.pid)
            except psutil.Error:
                continue
            rows.append((name[:60], rss))
        return (rows[0][1] if rows and rows[0][0] == "main" else 0), rows, pss

    def _sample_proc(self) -> tuple[int, list[tuple[str, int]], int]:
        main = _rss_proc(self.pid)
        rows = [("main", main)] + [(str(p), _rss_proc(p)) for p in _descendants_proc(self.pid)]
        return main, rows, 0

    def _loop(self) -> None:
        t0 = time.perf_counter()
        trace = None if self.trace is None else self.trace.open("w", encoding="utf-8")
        if trace is not None:
            trace.write("elapsed_s,main_mb,tree_mb,processes,breakdown\n")
        try:
            self._sample_until_stopped(t0, trace)
        finally:
            if trace is not None:
                trace.close()

    def _sample_until_stopped(self, t0: float, trace: Any) -> None:
        try:
            import psutil  # noqa: F401

            have_psutil = True
        except ImportError:
            have_psutil = False
        while not self._stop.is_set():
            with_pss = self.pss_every > 0 and self.samples % self.pss_every == 0
            main, rows, pss = self._sample_psutil(with_pss) if have_psutil else self._sample_proc()
            tree = sum(r for _, r in rows)
            self.samples += 1
            self.peak_main = max(self.peak_main, main)
            self.peak_tree_pss = max(self.peak_tree_pss, pss)
            self.max_processes = max(self.max_processes, len(rows))
            if tree > self.peak_tree:
                self.peak_tree = tree
                self.peak_breakdown = rows
            if trace is not None:
                parts = " ".join(f"{name}={rss // 1_000_000}" for name, rss in rows)
                elapsed = time.perf_counter() - t0
                mb = (main // 1_000_000, tree // 1_000_000)
                trace.write(f"{elapsed:.1f},{mb[0]},{mb[1]},{len(rows)},{parts}\n")
                trace.flush()
            self._stop.wait(self.interval_s)


# ----------------------------------------------------------------------------- driver


def _cli_child(rusage_json: str, argv: list[str]) -> None:
    """Run ``slidestream <argv>`` in this process; write its getrusage figures at exit."""

    def report() -> None:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        Path(rusage_json).write_text(json.dumps({"self": own, "children": kids}))

    atexit.register(report)
    from slidestream.cli import main

    sys.argv = ["slidestream", *argv]
    main()


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _generate(spec: NucleusSlide, path: Path) -> None:
    from slidestream.wsi.synthetic import write_pyramidal_tiff

    source: Callable[[int, int, int, int], npt.NDArray[np.uint8]] = spec.tile
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write_pyramidal_tiff(
        tmp,
        source,
        size=(spec.width_px, spec.height_px),
        mpp=spec.mpp,
        tile_size=256,
        compression="jpeg",
        quality=85,
        vendor_style="aperio",
    )
    tmp.replace(path)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == _CLI_CHILD:
        _cli_child(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nuclei", type=int, default=1_000_000, help="Nuclei at least.")
    parser.add_argument("--mpp", type=float, default=0.5, help="Level-0 µm/px.")
    parser.add_argument("--spacing-um", type=float, default=12.5, help="Nucleus grid pitch, µm.")
    parser.add_argument("--nuclei-model", default="classical", help="classical or default, ...")
    parser.add_argument("--work-dir", type=Path, default=None, help="Keep slide + outputs here.")
    parser.add_argument("--interval-s", type=float, default=0.5, help="RSS sampling period.")
    parser.add_argument("--trace", type=Path, default=None, help="CSV of every RSS sample.")
    parser.add_argument("--verbose", action="store_true", help="slidestream -v (timed log).")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More run options.")
    args = parser.parse_args()

    tmp_ctx = None
    if args.work_dir is None:
        tmp_ctx = tempfile.TemporaryDirectory(prefix="slidestream-memory-")
        work = Path(tmp_ctx.name)
    else:
        work = args.work_dir
        work.mkdir(parents=True, exist_ok=True)
    try:
        spec = size_for(args.nuclei, mpp=args.mpp, spacing_um=args.spacing_um)
        expected = spec.expected_count()
        slide_mm2 = spec.width_px * spec.height_px * spec.mpp**2 / 1e6
        print(
            f"slide: {spec.width_px} x {spec.height_px} px at {spec.mpp} µm/px "
            f"({slide_mm2:.1f} mm², {spec.width_px * spec.height_px / 1e6:.0f} Mpx); "
            f"nucleus grid pitch {spec.spacing_um} µm ({1e6 / spec.spacing_um**2:.0f} per mm² "
            f"of tissue); expected nuclei {expected:,}",
            flush=True,
        )
        slide = work / f"memory-{spec.width_px}x{spec.height_px}-{spec.mpp:g}.svs"
        if slide.exists():
            print(f"reusing {slide} ({slide.stat().st_size / 1e6:.0f} MB)", flush=True)
        else:
            t0 = time.perf_counter()
            _generate(spec, slide)
            gen_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(
                f"generated {slide} ({slide.stat().st_size / 1e6:.0f} MB) in "
                f"{time.perf_counter() - t0:.0f} s; generator peak RSS {_gb(gen_rss)}",
                flush=True,
            )

        out = work / "out"
        rusage_json = work / "rusage.json"
        rusage_json.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            _CLI_CHILD,
            str(rusage_json),
            *(["-v"] if args.verbose else []),
            "run",
            str(slide),
            "--out",
            str(out),
            "--nuclei-model",
            args.nuclei_model,
            "--force",
            "--no-progress",
            *args.extra,
        ]
        print("running: slidestream " + " ".join(cmd[4:]), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd)
        with TreeSampler(proc.pid, interval_s=args.interval_s, trace=args.trace) as sampler:
            rc = proc.wait()
        wall_s = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"slidestream run exited with {rc}")
        (folder,) = [p for p in out.iterdir() if (p / "summary.json").is_file()]
        summary: dict[str, Any] = json.loads((folder / "summary.json").read_text())
        usage = json.loads(rusage_json.read_text())
        stats = summary["statistics"]
        timings = summary["provenance"]["timings_s"]
        workers = summary["provenance"]["workers"]
        print(
            f"tissue {stats['tissue_area_mm2']:.1f} mm²; nuclei written "
            f"{stats['nucleus_count']:,} (expected {expected:,}); "
            f"{stats['nuclei_per_mm2']:.0f} per mm² of tissue"
        )
        print(
            f"wall time {wall_s:.0f} s (model {args.nuclei_model}, {workers['readers']} "
            f"reader(s), {workers['postprocess']} post-processing worker(s)); stages: "
            + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
        )
        print(
            f"peak RSS, main process: {_gb(sampler.peak_main)} sampled, "
            f"{_gb(usage['self'])} ru_maxrss"
        )
        print(
            f"peak RSS, process tree (sum over main + {sampler.max_processes - 1} descendants "
            f"max): {_gb(sampler.peak_tree)} sampled ({sampler.samples} samples every "
            f"{args.interval_s} s); PSS {_gb(sampler.peak_tree_pss)}; largest child ru_maxrss "
            f"{_gb(usage['children'])}"
        )
        print(
            "  at the tree peak: "
            + ", ".join(f"{name} {rss / 1e6:.0f} MB" for name, rss in sampler.peak_breakdown)
        )
        verdict = "PASS" if sampler.peak_tree < TARGET_BYTES else "FAIL"
        print(
            f"target: peak tree RSS < 3 GB with >= 1,000,000 nuclei -> {verdict}"
            + ("" if stats["nucleus_count"] >= 1_000_000 else " (fewer than 1M nuclei)")
        )
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()


if __name__ == "__main__":
    main()
