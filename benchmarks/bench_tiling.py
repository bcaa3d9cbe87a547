"""Tiling throughput: `bony tile` against the seed's naive loop and the JPEG decode limits, in one run.

    python benchmarks/bench_tiling.py [--slides 4] [--core-um 4000] [--margin-um 600] [--repeats 5] [--json benchmarks/results/tiling.json]

All rates are in grid tiles per second: the number of 224-px positions that cover the slides'
level 0 (what the seed cut), divided by wall time, so skipping glass counts as speed.

- naive: the seed's approach, OpenSlide ``read_region`` of every 224 tile, then the per-tile
  quality measures and keep rule on that tile alone;
- decode limit: only decoding every JPEG tile of level 0 once, at full resolution (tifffile +
  imagecodecs), nothing else: what any tiler that looks at all of level 0 must at least spend.
  ``bony tile`` does not look at all of level 0: it finds tissue on a low-resolution level and
  decodes only the level-0 tiles under it, so its ratio to this limit can exceed 1 without any
  trick, and would reach it only if the rest of its work (masks, measures, labels, files) cost
  less than decoding the glass it skips;
- decode of the read tiles: decoding, at full resolution, only the level-0 JPEG tiles that
  ``bony tile`` decodes (those under the grid tiles it reads): bony's own decode floor. Its ratio
  to bony is the share of bony's time that is decoding (1.0 would mean nothing else costs);
  tissue tiles decode slower than glass, so this is a larger share of the decode limit than the
  share of tiles;
- bony tile with 1 and 2 worker processes (fresh output folders, removed afterwards). Besides the
  wall time, the ``busy`` ratios use the time the workers spent tiling slides (the sum of
  ``slides.parquet``'s seconds, a slide's bands summed): with few slides, two workers' wall time
  also holds the pool's start and how the work splits between them (the largest of 4 synthetic
  slides is 42 % of it, which is why large slides are tiled in bands: each band finds the slide's
  tissue again, which shows in the busy time), while two workers slowing each other down (shared
  cache and memory) shows in both. ``bony_2_busy_share`` is the share of the two workers' wall
  time spent tiling. Each ``bony tile`` variant loads its compiled kernels (numba; :func:`bonylib.data.tiling.load_kernels`)
  before the clock starts, as it imports its modules: a cost once per run, not per slide, which is printed.

Each variant runs in its own process, which reports its peak resident memory; the variants run
in turn ``--repeats`` times and each one's median time is reported, so that load from other
programs on a shared machine hits them alike (ratios are the median of each round's ratio).
Targets (issue 22): bony ≥ 3x naive; with one worker ≥ 1.0 of the decode limit, with two ≥ 0.85
of it per worker. The machine (CPU model, torch's CPU capability, usable CPUs) is printed first
and saved with the results: the ratios depend on it, and on the load of a shared machine.

Last, :func:`scaled_decode` times decoding the tiles bony reads at full size and with libjpeg's DCT
scaling to 1/2 and 1/4: what measuring tiles on a reduced-scale decode would save.

:func:`project_hours` turns a measured rate into hours for the seed's PANDA run (10,616 slides,
2,852,703 kept tiles), printed for the 1- and 2-worker rates; ``benchmarks/bench_scale.py`` calls
it and the variant functions (:func:`decode_limit`, :func:`decode_read`, :func:`naive`,
:func:`bony_tile`) directly.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T = 224
SEED_SLIDES = 10_616
SEED_TILES = 2_852_703
"""The seed's PANDA tiling: slides in, kept tiles out."""


def _peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def _grid_tiles(slides: list[Path]) -> int:
    import openslide

    total = 0
    for path in slides:
        with openslide.OpenSlide(str(path)) as slide:
            w, h = slide.level_dimensions[0]
            total += (w // T) * (h // T)
    return total


def _decode(slides: list[Path], tiles: dict[str, set[int]] | None) -> dict[str, Any]:
    """Decode the level-0 JPEG tiles of ``slides`` once each, at full resolution: all of them, or those of
    ``tiles`` (file-tile indices by slide file name)."""
    import tifffile

    start, decoded = time.perf_counter(), 0
    for path in slides:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            decode = page.decode  # made on first use, and making it moves the file position
            fh = tif.filehandle
            wanted = None if tiles is None else tiles.get(path.name, set())
            for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
                if wanted is not None and index not in wanted:
                    continue
                fh.seek(offset)
                data = fh.read(count)
                decode(data, index, jpegtables=page.jpegtables)
                decoded += 1
    return {"seconds": time.perf_counter() - start, "jpeg_tiles": decoded, "peak_mb": _peak_mb()}


def decode_limit(slides: list[Path]) -> dict[str, Any]:
    """Decode every JPEG tile of every level-0 page once, at full resolution."""
    return _decode(slides, None)


def read_tiles(data: Path) -> dict[str, set[int]]:
    """The level-0 JPEG tiles (file-tile indices by slide file name) under the grid tiles ``bony tile`` reads in
    ``data``: the tiles it decodes. Found by tiling once (untimed) and reading the parts it wrote."""
    import pandas as pd
    import tifffile

    from bonylib.config import load_config
    from bonylib.data.tiling import TileConfig, tile

    out = Path(tempfile.mkdtemp(prefix="bench-tile-read-"))
    try:
        tile("panda", [data], out, load_config(TileConfig))
        parts = pd.concat([pd.read_parquet(p) for p in (out / "parts").glob("*.parquet")])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    tiles: dict[str, set[int]] = {}
    for path_name, rows in parts.groupby("path"):
        path = Path(str(path_name))
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tw, th, across = page.tilewidth, page.tilelength, -(-page.imagewidth // page.tilewidth)
        if (rows["level"] != 0).any():
            raise SystemExit(f"{path}: bony read level {rows['level'].max()}, the decode references are of level 0")
        wanted = tiles.setdefault(path.name, set())
        for x, y, size in zip(rows["x"], rows["y"], rows["size"]):
            wanted.update(ty * across + tx for ty in range(y // th, (y + size - 1) // th + 1)
                          for tx in range(x // tw, (x + size - 1) // tw + 1))
    return tiles


def decode_read(slides: list[Path], tiles: dict[str, set[int]]) -> dict[str, Any]:
    """Decode, once and at full resolution, only the level-0 JPEG tiles ``bony tile`` decodes (:func:`read_tiles`)."""
    return _decode(slides, tiles)


def scaled_decode(slides: list[Path], tiles: dict[str, set[int]]) -> dict[str, Any]:
    """Microseconds per tile to decode the JPEG tiles ``bony tile`` reads (:func:`read_tiles`) at full resolution
    (imagecodecs, as bony and the decode limit do) and with libjpeg's DCT scaling to 1/2 and 1/4 (Pillow's
    ``draft``, the one scaled decoder installed; also at full size, to separate its own overhead). Decoding at a
    reduced scale is what the quality measures could use where no shards are written: this says what it would save."""
    import io

    import imagecodecs
    import numpy as np
    import tifffile
    from PIL import Image

    streams: list[bytes] = []
    for path in slides:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tables = page.jpegtables
            for index in sorted(tiles.get(path.name, set())):
                tif.filehandle.seek(page.dataoffsets[index])
                data = tif.filehandle.read(page.databytecounts[index])
                # an abbreviated stream gets the page's tables after its start-of-image marker
                streams.append(data[:2] + tables[2:-2] + data[2:] if tables else data)

    def pillow(data: bytes, scale: int) -> np.ndarray:
        image = Image.open(io.BytesIO(data))
        if scale > 1:
            image.draft("RGB", (image.width // scale, image.height // scale))
        return np.asarray(image)

    ways = {"imagecodecs_full": imagecodecs.jpeg8_decode, "pillow_full": lambda d: pillow(d, 1),
            "pillow_half": lambda d: pillow(d, 2), "pillow_quarter": lambda d: pillow(d, 4)}
    result: dict[str, Any] = {"tiles": len(streams)}
    for name, decode in ways.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for data in streams:
                decode(data)
            best = min(best, time.perf_counter() - start)
        result[f"{name}_us"] = best / max(len(streams), 1) * 1e6
    return result


def naive(slides: list[Path]) -> dict[str, Any]:
    """The seed: read_region of each grid tile, then measure and filter it alone."""
    import numpy as np
    import openslide

    from bonylib.config import load_config
    from bonylib.data.quality import QualityConfig, keep_tiles, tile_measures

    cfg = load_config(QualityConfig)
    start, kept = time.perf_counter(), 0
    for path in slides:
        with openslide.OpenSlide(str(path)) as slide:
            w, h = slide.level_dimensions[0]
            for y in range(0, h - T + 1, T):
                for x in range(0, w - T + 1, T):
                    tile = np.asarray(slide.read_region((x, y), 0, (T, T)).convert("RGB"))
                    keep, _ = keep_tiles(tile_measures(tile[None]), cfg)
                    kept += int(keep[0])
    return {"seconds": time.perf_counter() - start, "kept_tiles": kept, "peak_mb": _peak_mb()}


def bony_tile(data: Path, workers: int) -> dict[str, Any]:
    """`bony tile` on the dataset into a fresh folder."""
    import pandas as pd

    from bonylib.config import load_config
    from bonylib.data.tiling import TileConfig, load_kernels, tile

    out = Path(tempfile.mkdtemp(prefix=f"bench-tile-{workers}-"))
    try:
        cfg = load_config(TileConfig, None, [f"workers={workers}"])
        kernels = load_kernels()  # once per run, as the imports: outside the timed region, and reported
        start = time.perf_counter()
        result = tile("panda", [data], out, cfg)
        seconds = time.perf_counter() - start
        slides = pd.read_parquet(out / "slides.parquet")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    kept = int(slides.kept_tiles.sum())
    return {"seconds": seconds, "busy_seconds": float(slides.seconds.sum()), "kept_tiles": kept,
            "read_tiles": int(slides.read_tiles.sum()), "failures": len(result.failures), "peak_mb": _peak_mb(),
            "kernel_load_seconds": kernels,
            "workers": workers, "kept_tiles_per_s_per_worker": kept / seconds / workers}


def project_hours(tiles_per_s_per_worker: float, workers: int, slides: int = SEED_SLIDES,
                  tiles_per_slide: float = SEED_TILES / SEED_SLIDES) -> float:
    """Hours to tile ``slides`` slides of ``tiles_per_slide`` kept tiles each (the seed's PANDA run by default:
    10,616 slides, 268.7 kept tiles each) on ``workers`` cores, at a measured rate of kept tiles per second per
    worker. It assumes the rate carries over from the benchmark's synthetic slides to the real ones (the same
    tissue share of the slide and the same cost per tile) and that the disk keeps up."""
    if tiles_per_s_per_worker <= 0 or workers < 1:
        raise ValueError("need a positive rate and at least one worker")
    return slides * tiles_per_slide / (tiles_per_s_per_worker * workers) / 3600


VARIANTS = {"decode_limit": decode_limit, "decode_read": decode_read, "naive": naive, "bony_1_worker": bony_tile,
            "bony_2_workers": bony_tile}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of (lower) median time, with its own counts and memory, and every round's seconds."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[(len(ordered) - 1) // 2], "all_seconds": [r["seconds"] for r in runs]}


def _ratios(seconds: dict[str, float]) -> dict[str, float]:
    """Speed ratios of one round (grid tiles/s of one variant over another's: the inverse time ratio)."""
    return {
        "bony_1_vs_naive": seconds["naive"] / seconds["bony_1_worker"],
        "bony_2_vs_naive": seconds["naive"] / seconds["bony_2_workers"],
        "bony_1_vs_decode_limit": seconds["decode_limit"] / seconds["bony_1_worker"],
        "bony_2_per_worker_vs_decode_limit": seconds["decode_limit"] / seconds["bony_2_workers"] / 2,
        "bony_1_vs_decode_read": seconds["decode_read"] / seconds["bony_1_worker"],
        "decode_read_vs_decode_limit": seconds["decode_read"] / seconds["decode_limit"],
        # on the time the workers spent tiling slides, without the start and the wait for the last slide
        "bony_1_busy_vs_decode_limit": seconds["decode_limit"] / seconds["bony_1_worker_busy"],
        "bony_2_per_worker_busy_vs_decode_limit": seconds["decode_limit"] / seconds["bony_2_workers_busy"],
        "bony_2_busy_share": seconds["bony_2_workers_busy"] / (2 * seconds["bony_2_workers"]),
    }


def _machine() -> tuple[dict[str, Any], str]:
    """``bonylib.runtime``'s machine record and its one-line description, from a child interpreter:
    it imports torch, and a child's peak memory starts from its parent's, so importing it here
    would add torch to every variant's peak."""
    code = ("import json; from bonylib.runtime import describe_machine, machine_record; "
            "r = machine_record(); print(json.dumps([r, describe_machine(r)]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    record, line = json.loads(done.stdout)
    return record, line


def _in_child(name: str, data: Path, tiles: Path | None = None) -> dict[str, Any]:
    """Run one variant in a fresh interpreter, so that its peak memory is its own (and its workers'). ``tiles`` is
    the file of bony's read tiles (:func:`read_tiles`), for the variants that write or read it."""
    done = subprocess.run([sys.executable, __file__, "--variant", name, str(data), *([str(tiles)] if tiles else [])],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _variant(name: str, data: Path, tiles: Path | None) -> None:
    slides = sorted((data / "train_images").glob("*.tiff"))
    if name == "read_tiles":  # in a child too: tiling's imports would raise every later child's peak
        tiles.write_text(json.dumps({k: sorted(v) for k, v in read_tiles(data).items()}))
        result = {}
    elif name.startswith("bony"):
        result = bony_tile(data, 1 if name == "bony_1_worker" else 2)
    elif name in ("decode_read", "scaled_decode"):
        wanted = {k: set(v) for k, v in json.loads(tiles.read_text()).items()}
        result = (decode_read if name == "decode_read" else scaled_decode)(slides, wanted)
    else:
        result = VARIANTS[name](slides)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4, help="synthetic PANDA slides to tile")
    parser.add_argument("--core-um", type=float, default=4000.0, help="biopsy core length (slide size) in µm")
    parser.add_argument("--margin-um", type=float, default=600.0,
                        help="glass around the cores in µm (600: the synthetic default, about a quarter of level 0 is "
                             "tissue; 3000: about PANDA's few per cent)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of all variants; each one's median is reported")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/tiling.json"), help="where to save the results")
    parser.add_argument("--variant", choices=sorted([*VARIANTS, "read_tiles", "scaled_decode"]), help=argparse.SUPPRESS)
    parser.add_argument("data", nargs="?", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("tiles", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _variant(args.variant, args.data, args.tiles)
        return

    machine, line = _machine()
    print(line)
    work = Path(tempfile.mkdtemp(prefix="bench-tiling-"))
    try:
        report = _measure(work, args.slides, args.core_um, args.margin_um, args.repeats, machine)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.json}")


def _measure(work: Path, n_slides: int, core_um: float, margin_um: float, repeats: int,
             machine: dict[str, Any]) -> dict[str, Any]:
    """Synthesize the slides into ``work``, run the rounds, print the table and return the report."""
    data = work / "panda"
    subprocess.run([sys.executable, "-m", "bonylib", "synth", "panda", str(data), f"panda.slides={n_slides}",
                    f"panda.core_length_um={core_um}", f"panda.margin_um={margin_um}", "workers=2"], check=True,
                   capture_output=True)
    slides = sorted((data / "train_images").glob("*.tiff"))
    grid = _grid_tiles(slides)
    tiles = work / "read_tiles.json"
    _in_child("read_tiles", data, tiles)
    rounds = [{name: _in_child(name, data, tiles) for name in VARIANTS} for _ in range(repeats)]
    results = {name: _median_run([r[name] for r in rounds]) for name in VARIANTS}
    for r in results.values():
        r["grid_tiles_per_s"] = grid / r["seconds"]
    # the ratio of each round, then their median: variants of one round ran under the same load
    per_round = [_ratios({**{name: r[name]["seconds"] for name in VARIANTS},
                          **{f"{name}_busy": r[name]["busy_seconds"] for name in ("bony_1_worker", "bony_2_workers")}})
                 for r in rounds]
    ratios = {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}
    projection = {name: {f"{cores}_cores": project_hours(results[name]["kept_tiles_per_s_per_worker"], cores)
                         for cores in (2, 16, 64)} for name in ("bony_1_worker", "bony_2_workers")}
    scaled = _in_child("scaled_decode", data, tiles)
    kept = results["bony_1_worker"]["kept_tiles"]
    report = {
        "machine": machine, "slides": len(slides), "grid_tiles": grid, "tile_px": T, "repeats": repeats,
        "margin_um": margin_um, "kept_share": kept / grid, "results": results, "ratios": ratios, "scaled_decode": scaled,
        "targets": {"bony_vs_naive": 3.0, "bony_1_vs_decode_limit": 1.0, "bony_2_per_worker_vs_decode_limit": 0.85},
        "seed_projection_hours": projection,
    }
    print(f"{len(slides)} slides, {grid} grid tiles of {T} px at level 0, {kept} kept ({kept / grid:.1%}; PANDA's "
          f"seed: about 3 %), medians of {repeats} rounds")
    print(f"{'variant':<16}{'seconds':>9}{'grid tiles/s':>14}{'peak MB':>9}")
    for name, r in results.items():
        print(f"{name:<16}{r['seconds']:>9.2f}{r['grid_tiles_per_s']:>14.0f}{r['peak_mb']:>9.0f}")
    for name, value in ratios.items():
        print(f"{name:<40}{value:6.2f}")
    print("bony tile's compiled kernels, loaded once per run before the clock: "
          + ", ".join(f"{results[name]['kernel_load_seconds']:.2f} s ({name})" for name in ("bony_1_worker", "bony_2_workers")))
    print(f"decoding bony's {scaled['tiles']} JPEG tiles, µs per tile: " + ", ".join(
        f"{key.removesuffix('_us')} {value:.0f}" for key, value in scaled.items() if key.endswith("_us")))
    for name, hours in projection.items():
        rate = results[name]["kept_tiles_per_s_per_worker"]
        print(f"seed's {SEED_SLIDES} slides ({SEED_TILES} tiles) at {name}'s {rate:.0f} kept tiles/s per worker: "
              + ", ".join(f"{h:.2g} h on {k.replace('_', ' ')}" for k, h in hours.items()))
    return report


if __name__ == "__main__":
    main()
