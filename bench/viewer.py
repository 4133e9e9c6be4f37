"""Benchmark ``slidestream view``: DeepZoom tile latency, nucleus overlay tiles, server memory.

Targets (issue #24, on this CPU): DZI tile p95 < 100 ms cached and < 300 ms cold with several
concurrent clients on a 40x slide; a nucleus overlay tile of a slide with 1,000,000 nuclei
p95 < 300 ms; and the server's memory with 10 slides open.

1. Generates (once, in ``--work-dir``) a 40x (0.25 µm/px) Aperio-style pyramidal JPEG slide of
   ``--width`` x ``--height`` px (default 60,000 x 45,000 = 2.7 Gpx, a large biopsy) whose tissue
   (an ellipse over ~70 % of it) is tiled from the demo slide's H&E texture, and an output folder
   ``OUT`` of 10 analysed slides (``summary.json``, ``tissue.geojson``; ``nuclei.parquet`` and
   ``nuclei.geojson.gz`` with ``--nuclei`` nuclei written by the project's own writers) that all
   name that slide file (under 10 different names, hard links), plus
   ``CMU-1-Small-Region.svs`` from ``../shared/data/slides`` when present.
2. Starts ``slidestream view OUT --no-db`` in a child process and plays ``--clients``
   concurrent clients over HTTP (keep-alive), each zooming into its own region the way
   OpenSeadragon does (every tile of a 1,400 x 900 px viewport at each DeepZoom level from the
   whole slide down to full resolution).
3. Prints p50/p95/max latency (client side, HTTP round trip) of slide tiles **cold** (a fresh
   server: nothing cached but the OS page cache) and **cached** (the same requests again), of
   nucleus overlay tiles (density at low zoom, dots further in) and of the nuclei-in-a-box API at
   outline zoom, and the server's resident memory (VmRSS, peak VmHWM) with 1 and 10 slides open.

Usage: ``python bench/viewer.py [--work-dir /tmp/viewer-bench] [--clients 4] [--nuclei 1000000]``
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
MPP = 0.25
VIEWPORT = (1400, 900)
N_SLIDES = 10
CLASSES = np.array(["tumour", "non_tumour"])
COLOURS = {"tumour": (230, 25, 75), "non_tumour": (60, 170, 75)}
MEASUREMENTS = (
    "area_um2", "perimeter_um", "equivalent_diameter_um", "major_axis_um", "minor_axis_um",
    "eccentricity", "solidity", "circularity", "mean_r", "mean_g", "mean_b",
    "hematoxylin_od", "eosin_od",
)  # fmt: skip


# ----------------------------------------------------------------------------- data


def _texture() -> npt.NDArray[np.uint8]:
    from slidestream.demo_slide import DemoSlideSpec, render_demo_image

    rgb, _ = render_demo_image(DemoSlideSpec(width_px=2048, height_px=2048, mpp=MPP, seed=5))
    return rgb[256:1792, 256:1792].copy()  # tissue only (the demo's outline is inside)


def write_slide(path: Path, width: int, height: int) -> None:
    """A pyramidal JPEG slide: H&E texture inside an ellipse, white glass outside."""
    from slidestream.wsi.synthetic import write_pyramidal_tiff

    texture = _texture()
    th, tw = texture.shape[:2]
    white = np.full((256, 256, 3), 242, np.uint8)

    def source(x: int, y: int, w: int, h: int) -> npt.NDArray[np.uint8]:
        yy, xx = np.mgrid[y : y + h, x : x + w]
        inside = ((xx - width / 2) / (0.46 * width)) ** 2 + (
            (yy - height / 2) / (0.46 * height)
        ) ** 2 <= 1.0
        if not inside.any():
            return white[:h, :w]
        tile = np.take(np.take(texture, np.arange(y, y + h) % th, 0), np.arange(x, x + w) % tw, 1)
        return np.where(inside[..., None], tile, 242).astype(np.uint8)

    write_pyramidal_tiff(
        path, source, mpp=MPP, size=(width, height), quality=80, vendor_style="aperio"
    )


def _nucleus_tables(
    n: int, width: int, height: int, chunk: int = 20_000, seed: int = 1
) -> Iterator[Any]:
    """``n`` ellipse nuclei inside the tissue ellipse, in 512 px tile order like a real run."""
    from slidestream.overlays import NucleusTable

    rng = np.random.default_rng(seed)
    cx = rng.uniform(0, width, int(n * 2))
    cy = rng.uniform(0, height, int(n * 2))
    keep = ((cx - width / 2) / (0.45 * width)) ** 2 + (
        (cy - height / 2) / (0.45 * height)
    ) ** 2 <= 1
    cx, cy = cx[keep][:n], cy[keep][:n]
    order = np.lexsort((cx // 512, cy // 512))
    cx, cy = cx[order], cy[order]
    vertices = 16
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    for start in range(0, cx.size, chunk):
        x, y = cx[start : start + chunk], cy[start : start + chunk]
        k = x.size
        a = rng.uniform(2.0, 4.5, k) / MPP
        b = a * rng.uniform(0.5, 1.0, k)
        theta = rng.uniform(0, np.pi, k)
        ex, ey = a[:, None] * np.cos(t), b[:, None] * np.sin(t)
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        ring = np.stack([x[:, None] + ex * c - ey * s, y[:, None] + ex * s + ey * c], axis=2)
        ring = np.concatenate([ring, ring[:, :1]], axis=1)
        meas = {m: rng.uniform(0.1, 1.0, k) for m in MEASUREMENTS}
        meas["area_um2"] = np.pi * a * b * MPP * MPP
        meas["equivalent_diameter_um"] = 2 * np.sqrt(a * b) * MPP
        half = np.maximum(a, b)
        yield NucleusTable(
            centroid_x=x,
            centroid_y=y,
            bbox_x0=x - half,
            bbox_y0=y - half,
            bbox_x1=x + half,
            bbox_y1=y + half,
            coords=ring.reshape(-1, 2),
            offsets=np.arange(k + 1, dtype=np.int64) * (vertices + 1),
            measurements=meas,
            classes=CLASSES[(x > width / 2).astype(int)],
        )


def write_results(out: Path, slide: Path, n_nuclei: int, width: int, height: int) -> None:
    """OUT with ``N_SLIDES`` analysed slides naming ``slide`` (hard links of one result set)."""
    import shapely

    from slidestream.overlays import write_nuclei_geojson, write_tissue_geojson
    from slidestream.wsi import open_slide

    with open_slide(slide) as s:
        fingerprint = s.fingerprint
    first = out / "slide-00"
    first.mkdir(parents=True)
    t0 = time.perf_counter()
    count = write_nuclei_geojson(
        first / "nuclei.geojson.gz",
        _nucleus_tables(n_nuclei, width, height),
        id_namespace=fingerprint,
        class_colors=COLOURS,
        parquet_path=first / "nuclei.parquet",
    )
    print(f"  {count:,} nuclei written in {time.perf_counter() - t0:.1f} s")
    ellipse = shapely.affinity.scale(
        shapely.Point(width / 2, height / 2).buffer(1.0, 64), 0.46 * width, 0.46 * height
    )
    left = shapely.box(0, 0, width / 2, height)
    polygons = {
        "non_tumour": ellipse.intersection(left),
        "tumour": ellipse.difference(left),
    }
    write_tissue_geojson(
        first / "tissue.geojson",
        polygons,
        class_colors=COLOURS,
        mpp=MPP,
        id_namespace=fingerprint,
    )
    area = ellipse.area * MPP * MPP / 1e6
    for i in range(N_SLIDES):
        folder = out / f"slide-{i:02d}"
        folder.mkdir(exist_ok=True)
        link = slide.with_name(f"{slide.stem}-{i:02d}{slide.suffix}")
        if not link.exists():
            os.link(slide, link)
        if i:
            for name in ("nuclei.geojson.gz", "nuclei.parquet", "tissue.geojson"):
                os.link(first / name, folder / name)
        summary = {
            "schema": "slidestream.summary/1",
            "slide": {
                "name": folder.name,
                "path": str(link),
                "fingerprint": fingerprint,
                "vendor": "aperio",
                "width": width,
                "height": height,
                "mpp_x": MPP,
                "mpp_y": MPP,
                "objective_power": 40.0,
            },
            "statistics": {
                "tissue_area_mm2": area,
                "nucleus_count": count,
                "nuclei_per_mm2": count / area,
                "classes": {},
            },
            "provenance": {},
            "outputs": {},
        }
        (folder / "summary.json").write_text(json.dumps(summary))


def add_real_slide(out: Path, path: Path) -> str | None:
    from slidestream.wsi import open_slide

    if not path.is_file():
        return None
    with open_slide(path) as s:
        name = s.name
        summary = {
            "slide": {
                "name": name,
                "path": str(path),
                "fingerprint": s.fingerprint,
                "width": s.dimensions[0],
                "height": s.dimensions[1],
                "mpp_x": s.mpp_x,
                "mpp_y": s.mpp_y,
            },
            "statistics": {},
        }
    (out / name).mkdir(exist_ok=True)
    (out / name / "summary.json").write_text(json.dumps(summary))
    return name


# ----------------------------------------------------------------------------- clients


def dz_levels(width: int, height: int) -> list[tuple[int, int]]:
    dims = [(width, height)]
    while dims[-1] != (1, 1):
        w, h = dims[-1]
        dims.append((max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2))))
    return dims[::-1]


def zoom_path(
    width: int, height: int, centre: tuple[float, float], tile: int = 254
) -> list[tuple[int, int, int]]:
    """Tiles OpenSeadragon loads zooming from the whole slide into ``centre`` (level-0 px)."""
    levels = dz_levels(width, height)
    top = len(levels) - 1
    out: list[tuple[int, int, int]] = []
    for z in range(max(0, top - 8), top + 1):
        w, h = levels[z]
        scale = 2 ** (top - z)
        cx, cy = centre[0] / scale, centre[1] / scale
        x0, x1 = max(0.0, cx - VIEWPORT[0] / 2), min(float(w), cx + VIEWPORT[0] / 2)
        y0, y1 = max(0.0, cy - VIEWPORT[1] / 2), min(float(h), cy + VIEWPORT[1] / 2)
        for row in range(int(y0 // tile), int(max(y0, y1 - 1) // tile) + 1):
            for col in range(int(x0 // tile), int(max(x0, x1 - 1) // tile) + 1):
                out.append((z, col, row))
    return out


class Client:
    """One keep-alive HTTP connection recording request latencies (ms)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def get(self, path: str) -> tuple[float, int, bytes]:
        t0 = time.perf_counter()
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        body = response.read()
        return (time.perf_counter() - t0) * 1000.0, response.status, body


def play(port: int, jobs: Sequence[Sequence[str]]) -> list[float]:
    """Each job (a list of paths) on its own client, all concurrently; latencies in ms."""

    def run(paths: Sequence[str]) -> list[float]:
        client = Client(port)
        times = []
        for path in paths:
            ms, status, body = client.get(path)
            if status != 200:
                raise RuntimeError(f"{path}: HTTP {status}: {body[:200]!r}")
            times.append(ms)
        client.conn.close()
        return times

    with ThreadPoolExecutor(len(jobs)) as pool:
        return [t for times in pool.map(run, jobs) for t in times]


def summary_line(label: str, times: Sequence[float]) -> str:
    a = np.asarray(times)
    return (
        f"{label:<44} n={a.size:>5}  p50 {np.percentile(a, 50):7.1f} ms  "
        f"p95 {np.percentile(a, 95):7.1f} ms  max {a.max():7.1f} ms"
    )


class Server:
    """``slidestream view OUT --no-db`` in a child process."""

    def __init__(self, out: Path, tile_cache_mb: int) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "slidestream",
                "view",
                str(out),
                "--no-db",
                "--port",
                str(self.port),
                "--tile-cache-mb",
                str(tile_cache_mb),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(
            "viewer did not start: " + (self.proc.stderr.read() if self.proc.stderr else "")
        )

    def memory_mib(self) -> tuple[float, float]:
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


# ----------------------------------------------------------------------------- main


def tile_jobs(
    name: str, width: int, height: int, clients: int, kind: str, seed: int
) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    ext = "jpeg" if kind == "slide" else "png"
    jobs = []
    for _ in range(clients):
        # a point inside the tissue ellipse
        angle, radius = rng.uniform(0, 2 * np.pi), 0.35 * math.sqrt(rng.uniform())
        centre = (
            width * (0.5 + radius * math.cos(angle)),
            height * (0.5 + radius * math.sin(angle)),
        )
        base = f"/api/slides/{quote(name, safe='')}/{kind}_files"
        jobs.append([f"{base}/{z}/{c}_{r}.{ext}" for z, c, r in zoom_path(width, height, centre)])
    return jobs


def bench_slide_tiles(
    out: Path, name: str, width: int, height: int, clients: int, cache_mb: int
) -> None:
    jobs = tile_jobs(name, width, height, clients, "slide", seed=len(name))
    server = Server(out, cache_mb)
    try:
        Client(server.port).get(f"/api/slides/{quote(name, safe='')}/slide.dzi")  # opens the slide
        cold = play(server.port, jobs)
        cached = play(server.port, jobs)
    finally:
        server.stop()
    print(summary_line(f"{name}: slide tiles cold, {clients} clients", cold))
    print(summary_line(f"{name}: slide tiles cached, {clients} clients", cached))


def bench_nuclei(out: Path, width: int, height: int, clients: int, cache_mb: int) -> None:
    name = "slide-00"
    jobs = tile_jobs(name, width, height, clients, "nuclei", seed=7)
    server = Server(out, cache_mb)
    try:
        client = Client(server.port)
        ms, _, body = client.get(f"/api/slides/{name}")  # builds the nucleus index
        count = json.loads(body)["nuclei"]["count"]
        print(f"{name}: {count:,} nuclei; index built by the first request in {ms:.0f} ms")
        overlay = play(server.port, jobs)
        rng = np.random.default_rng(3)
        box_w, box_h = VIEWPORT[0] * 0.8 / MPP / 1.5, VIEWPORT[1] * 0.8 / MPP / 1.5
        boxes = []
        for _ in range(clients * 5):
            cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
            x0, y0 = cx - box_w / 2, cy - box_h / 2
            boxes.append(f"{x0:.0f},{y0:.0f},{x0 + box_w:.0f},{y0 + box_h:.0f}")
        first_ms, _, first = Client(server.port).get(
            f"/api/slides/{name}/nuclei?bbox={boxes[0]}&limit=6000"
        )
        print(
            f"{name}: first nuclei-in-a-box request (indexes nuclei.geojson.gz) {first_ms:.0f} ms, "
            f"{json.loads(first)['count']} nuclei"
        )
        box_jobs = [
            [f"/api/slides/{name}/nuclei?bbox={b}&limit=6000" for b in boxes[i::clients]]
            for i in range(clients)
        ]
        boxes_ms = play(server.port, box_jobs)
        fresh = Client(server.port)
        sizes = [json.loads(fresh.get(p)[2])["count"] for p in box_jobs[0][:3]]
    finally:
        server.stop()
    print(summary_line(f"{name}: nucleus overlay tiles cold, {clients} clients", overlay))
    print(summary_line(f"{name}: nuclei in a viewport box ({np.mean(sizes):.0f}/box)", boxes_ms))


def bench_memory(out: Path, width: int, height: int, cache_mb: int) -> None:
    server = Server(out, cache_mb)
    try:
        rss0, _ = server.memory_mib()
        print(f"server memory: {rss0:.0f} MiB idle")
        for i in range(N_SLIDES):
            name = f"slide-{i:02d}"
            jobs = tile_jobs(name, width, height, 2, "slide", seed=i) + tile_jobs(
                name, width, height, 1, "nuclei", seed=i
            )
            play(server.port, jobs)
            Client(server.port).get(
                f"/api/slides/{name}/nuclei?bbox=20000,15000,23000,17000&limit=6000"
            )
            if i in (0, 4, N_SLIDES - 1):
                rss, hwm = server.memory_mib()
                print(f"server memory with {i + 1:>2} slides open: RSS {rss:.0f} MiB", end="")
                print(f" (peak {hwm:.0f} MiB)")
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/viewer-bench"))
    ap.add_argument("--width", type=int, default=60_000)
    ap.add_argument("--height", type=int, default=45_000)
    ap.add_argument("--nuclei", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--tile-cache-mb", type=int, default=256)
    ap.add_argument("--regenerate", action="store_true")
    args = ap.parse_args(argv)
    work: Path = args.work_dir
    slide = work / "slides" / "bench-40x.svs"
    out = work / "out"
    if args.regenerate:
        shutil.rmtree(work, ignore_errors=True)
    if not slide.exists():
        slide.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_slide(slide, args.width, args.height)
        print(
            f"generated {slide} ({args.width}x{args.height} px, "
            f"{slide.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s"
        )
    if not (out / f"slide-{N_SLIDES - 1:02d}" / "summary.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        write_results(out, slide, args.nuclei, args.width, args.height)
    cmu = add_real_slide(out, ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs")
    print(f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()}")
    bench_slide_tiles(out, "slide-00", args.width, args.height, args.clients, args.tile_cache_mb)
    if cmu:
        info = json.loads((out / cmu / "summary.json").read_text())["slide"]
        bench_slide_tiles(out, cmu, info["width"], info["height"], args.clients, args.tile_cache_mb)
    bench_nuclei(out, args.width, args.height, args.clients, args.tile_cache_mb)
    bench_memory(out, args.width, args.height, args.tile_cache_mb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
