"""Tiling throughput: `bony tile` against the seed's naive loop and the JPEG decode limit, in one run.

    python benchmarks/bench_tiling.py [--slides 4] [--core-um 4000] [--repeats 3] [--json benchmarks/results/tiling.json]

All rates are in grid tiles per second: the number of 224-px positions that cover the slides'
level 0 (what the seed cut), divided by wall time, so skipping glass counts as speed.

- naive: the seed's approach, OpenSlide ``read_region`` of every 224 tile, then the per-tile
  quality measures and keep rule on that tile alone;
- decode limit: only decoding every JPEG tile of level 0 once (tifffile + imagecodecs), nothing
  else — what any tiler that looks at all of level 0 must at least spend;
- bony tile with 1 and 2 worker processes (fresh output folders).

Each variant runs in its own process, which reports its peak resident memory; the variants run
in turn ``--repeats`` times and each one's median time is reported, so that load from other
programs on a shared machine hits them alike. Targets: bony ≥ 3x naive; with one worker ≥ 1.0 of
the decode limit, with two ≥ 0.8 of it per worker. The machine (CPU model, kernel level, usable
CPUs) is printed first and saved with the results: the ratios depend on it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T = 224


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


def decode_limit(slides: list[Path]) -> dict[str, Any]:
    """Decode every JPEG tile of every level-0 page once."""
    import tifffile

    start, decoded = time.perf_counter(), 0
    for path in slides:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            decode = page.decode  # made on first use, and making it moves the file position
            fh = tif.filehandle
            for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
                fh.seek(offset)
                data = fh.read(count)
                decode(data, index, jpegtables=page.jpegtables)
                decoded += 1
    return {"seconds": time.perf_counter() - start, "jpeg_tiles": decoded, "peak_mb": _peak_mb()}


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
    from bonylib.data.tiling import TileConfig, tile

    out = Path(tempfile.mkdtemp(prefix=f"bench-tile-{workers}-"))
    cfg = load_config(TileConfig, None, [f"workers={workers}"])
    start = time.perf_counter()
    result = tile("panda", [data], out, cfg)
    seconds = time.perf_counter() - start
    slides = pd.read_parquet(out / "slides.parquet")
    return {"seconds": seconds, "kept_tiles": int(slides.kept_tiles.sum()), "read_tiles": int(slides.read_tiles.sum()),
            "failures": len(result.failures), "peak_mb": _peak_mb()}


VARIANTS = {"decode_limit": decode_limit, "naive": naive, "bony_1_worker": bony_tile, "bony_2_workers": bony_tile}


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


def _in_child(name: str, data: Path) -> dict[str, Any]:
    """Run one variant in a fresh interpreter, so that its peak memory is its own (and its workers')."""
    done = subprocess.run([sys.executable, __file__, "--variant", name, str(data)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _variant(name: str, data: Path) -> None:
    slides = sorted((data / "train_images").glob("*.tiff"))
    if name.startswith("bony"):
        result = bony_tile(data, 1 if name == "bony_1_worker" else 2)
    else:
        result = VARIANTS[name](slides)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4, help="synthetic PANDA slides to tile")
    parser.add_argument("--core-um", type=float, default=4000.0, help="biopsy core length (slide size) in µm")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all variants; each one's median is reported")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/tiling.json"), help="where to save the results")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("data", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _variant(args.variant, args.data)
        return

    machine, line = _machine()
    print(line)
    work = Path(tempfile.mkdtemp(prefix="bench-tiling-"))
    data = work / "panda"
    subprocess.run([sys.executable, "-m", "bonylib", "synth", "panda", str(data), f"panda.slides={args.slides}",
                    f"panda.core_length_um={args.core_um}", "workers=2"], check=True, capture_output=True)
    slides = sorted((data / "train_images").glob("*.tiff"))
    grid = _grid_tiles(slides)
    rounds = [{name: _in_child(name, data) for name in VARIANTS} for _ in range(args.repeats)]
    results = {name: _median_run([r[name] for r in rounds]) for name in VARIANTS}
    for r in results.values():
        r["grid_tiles_per_s"] = grid / r["seconds"]
    # the ratio of each round, then their median: variants of one round ran under the same load
    per_round = [_ratios({name: r[name]["seconds"] for name in VARIANTS}) for r in rounds]
    ratios = {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}
    report = {
        "machine": machine, "slides": len(slides), "grid_tiles": grid, "tile_px": T, "repeats": args.repeats,
        "results": results, "ratios": ratios,
        "targets": {"bony_vs_naive": 3.0, "bony_1_vs_decode_limit": 1.0, "bony_2_per_worker_vs_decode_limit": 0.8},
    }
    print(f"{len(slides)} slides, {grid} grid tiles of {T} px at level 0, medians of {args.repeats} rounds")
    print(f"{'variant':<16}{'seconds':>9}{'grid tiles/s':>14}{'peak MB':>9}")
    for name, r in results.items():
        print(f"{name:<16}{r['seconds']:>9.2f}{r['grid_tiles_per_s']:>14.0f}{r['peak_mb']:>9.0f}")
    for name, value in ratios.items():
        print(f"{name:<36}{value:6.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
