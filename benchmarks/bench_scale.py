"""Scale: `bony evaluate`'s heads, `bony tile` and `bony embed` at growing sizes, with growth exponents and the
projection to the seed's PANDA (2,852,703 tiles of 10,616 slides, 4096-d head output).

    python benchmarks/bench_scale.py [--sizes 10000 30000 100000 300000 1000000] [--dim 4096] [--dtype float16]
                                     [--quick] [--device cpu] [--knn-max-rows 300000] [--skip tile embed]
                                     [--work /tmp/bench-scale] [--json benchmarks/results/scale.json]

For each size a synthetic PANDA is written: a tile manifest (about 270 tiles a slide, as PANDA's 2.85 M / 10,616),
a ``train.csv`` of ISUP grades, and an embedding store with class structure (each tile: its class's mean, its
slide's offset and Gaussian noise; a slide's tile classes follow its grade). The store is filed under a random
encoder's fingerprint in the evaluation folder, so ``bony evaluate`` finds it computed and goes straight to the
heads: each head (the PANDA MLP, the linear probe, k-NN, slide-level ABMIL) is one ``bony evaluate`` process, whose
wall time and peak resident set (``ru_maxrss`` of that process, from ``wait4``) are recorded, with the head's own fit
time from its run record. Time and memory are fitted against the row count: seconds as ``a * n**b`` (least squares
in log-log), peak RSS as ``a + b * n`` (what grows with the rows is per-row bookkeeping: the manifest, ids,
targets, predictions); both are projected to 2.85 M rows beside the measured points. The store is verified
(checksums, ids, finite values) once, after it is written; that cost is reported on its own.

The heads train for a fixed number of steps (``probe.max_steps``, ABMIL a fixed number of epochs), so their
training costs the same at every size (ABMIL's epoch reads every training tile: linear); what grows is the
passes over rows: statistics over the train rows, validation and test predictions, bootstrap over test slides.
k-NN compares every test row with every train row: its exponent is about 2 and it is measured up to
``--knn-max-rows`` (beyond: projected). Tiling and embedding reuse bench_tiling's and bench_embed's measurements:
tiles/s per worker and per device, projected to hours for PANDA on N cores.

The machine is printed and saved with the results. Disk: stores are float16 by default (1 M x 4096: 8.2 GB), a size
is skipped when writing it would leave less than 15 GB free, and each size's folder is deleted after it is measured
(``--keep`` keeps them). ``--quick`` (narrow MLP, few steps, one tiling round) checks the whole path in minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_embed  # noqa: E402  (sibling benchmarks: their measurements, reused)
import bench_tiling  # noqa: E402

SEED_TILES = 2_852_703
SEED_SLIDES = 10_616
TILES_PER_SLIDE = round(SEED_TILES / SEED_SLIDES)  # 269
SPEC = "random:xcit_nano_12_p16_224:0"
"""The encoder the synthetic stores are filed under: cheap to build, never run on a tile here."""
CLASSES = ("benign", "G3", "G4", "G5")
GRADE_MIX = np.array([  # share of each tile class on a slide of ISUP grade 0..5 (benign, G3, G4, G5)
    [1.0, 0.0, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0], [0.5, 0.35, 0.15, 0.0],
    [0.45, 0.15, 0.4, 0.0], [0.4, 0.0, 0.6, 0.0], [0.3, 0.0, 0.4, 0.3]])
HEADS = {"mlp": "panda", "linear": "panda", "knn": "panda", "abmil": "isup"}
FREE_GB = 15.0


def settings(quick: bool) -> dict[str, Any]:
    """The heads' protocol here: eva's and the seed's, with a fixed, small step budget (see the module docstring)."""
    if quick:
        return {"probe": {"max_steps": 30, "eval_every": 15, "patience": 100, "mlp_hidden": [512, 128]},
                "isup": {"max_epochs": 2, "patience": 100}, "bootstrap": 100}
    return {"probe": {"max_steps": 200, "eval_every": 100, "patience": 100},  # the seed's MLP widths
            "isup": {"max_epochs": 5, "patience": 100}, "bootstrap": 1000}


# ---- synthetic data -------------------------------------------------------------------------------------------


def write_data(folder: Path, rows: int, dim: int, dtype: str, seed: int = 0) -> dict[str, Any]:
    """Manifest, train.csv and the store of ``rows`` tiles in ``folder``; returns the paths and the writing times."""
    import pandas as pd

    from bonylib.evaluation.embeddings import open_embeddings, write_store
    from bonylib.files import sha256_file
    from bonylib.models.registry import encoder_from_spec

    rng = np.random.default_rng(seed)
    slides = max(30, math.ceil(rows / TILES_PER_SLIDE))
    grades = rng.permutation(np.arange(slides) % 6)
    slide_of = np.sort(np.arange(rows) % slides)  # a slide's tiles together, as bony tile writes them
    within = np.arange(rows) - np.searchsorted(slide_of, slide_of)
    cumulative = GRADE_MIX.cumsum(1)[grades[slide_of]]
    labels = (rng.random(rows)[:, None] > cumulative).sum(1).clip(0, len(CLASSES) - 1)
    names = np.array([f"slide{i:06d}" for i in range(slides)])
    (folder / "panda").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image_id": names, "data_provider": "radboud", "isup_grade": grades}).to_csv(
        folder / "panda" / "train.csv", index=False)
    manifest = folder / "manifest.parquet"
    pd.DataFrame({"slide_id": names[slide_of], "level": 0, "x": within * 224, "y": 0, "size": 224,
                  "label_name": np.array(CLASSES)[labels]}).to_parquet(manifest)

    class_means = rng.normal(0.0, 0.03, size=(len(CLASSES), dim)).astype(np.float32)
    slide_offsets = rng.normal(0.0, 0.02, size=(slides, dim)).astype(np.float32)

    def blocks(block: int = 8192):
        for start in range(0, rows, block):
            stop = min(start + block, rows)
            noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * 0.5
            yield (noise + class_means[labels[start:stop]] + slide_offsets[slide_of[start:stop]]).astype(dtype)

    encoder = encoder_from_spec(SPEC)
    out = folder / "evaluation"
    start = time.perf_counter()
    store_root = out / "embeddings" / sha256_file(manifest)[:16]
    store = write_store(store_root, manifest, encoder.name, encoder.fingerprint("cls"), blocks())
    written = time.perf_counter() - start
    start = time.perf_counter()
    open_embeddings(store, manifest).close()  # verified and recorded once
    verified = time.perf_counter() - start
    return {"manifest": manifest, "data": folder / "panda", "out": out, "slides": slides,
            "write_s": written, "verify_s": verified}


def config(data: dict[str, Any], head: str, dtype: str, quick: bool, device: str, path: Path) -> Path:
    """The ``bony evaluate`` config of one measurement."""
    import yaml

    protocol = settings(quick)
    cfg: dict[str, Any] = {"encoders": [{"name": "synthetic", "specs": [SPEC]}], "benchmarks": [HEADS[head]],
                           "bootstrap": protocol["bootstrap"], "embed": {"pooled_dtype": dtype, "device": device}}
    if HEADS[head] == "panda":
        cfg["panda"] = {"manifest": str(data["manifest"]), "data": str(data["data"]), "heads": [head], "runs": 1,
                        "probe": protocol["probe"]}
    else:
        cfg["isup"] = {"manifest": str(data["manifest"]), "data": str(data["data"]), "runs": 1, **protocol["isup"]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def measure(data: dict[str, Any], head: str, cfg: Path) -> dict[str, Any]:
    """One ``bony evaluate`` process for ``head``: wall seconds, its peak RSS, and its run record's fit seconds."""
    out = data["out"]
    shutil.rmtree(out / "runs", ignore_errors=True)  # a finished run would be kept, not measured
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "bonylib", "evaluate", "--out", str(out), "--config", str(cfg)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read() if process.stderr else ""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"bony evaluate ({head}) failed:\n{stderr[-3000:]}")
    record = next((out / "runs").rglob("*.json"))
    run = json.loads(record.read_text())
    return {"seconds": seconds, "fit_seconds": run["seconds"], "peak_rss_mb": usage.ru_maxrss / 1024,
            "metrics": run["metrics"]}


# ---- growth -----------------------------------------------------------------------------------------------------


def power_fit(sizes: list[float], values: list[float]) -> tuple[float, float]:
    """(a, b) of ``value = a * size ** b`` by least squares on the logarithms."""
    b, log_a = np.polyfit(np.log(sizes), np.log(values), 1)
    return float(np.exp(log_a)), float(b)


def linear_fit(sizes: list[float], values: list[float]) -> tuple[float, float]:
    """(a, b) of ``value = a + b * size`` by least squares."""
    b, a = np.polyfit(sizes, values, 1)
    return float(a), float(b)


def growth(points: list[dict[str, Any]], target: int) -> dict[str, Any]:
    """Exponents of a head's measured points and their projection to ``target`` rows."""
    sizes = [p["rows"] for p in points]
    result: dict[str, Any] = {"measured_rows": sizes}
    if len(points) < 2:
        return result
    for key in ("seconds", "fit_seconds"):
        a, b = power_fit(sizes, [p[key] for p in points])
        result[f"{key}_exponent"] = b
        # the last two points' exponent: the one the largest sizes show, fixed costs mattering least there
        local = math.log(points[-1][key] / points[-2][key]) / math.log(sizes[-1] / sizes[-2])
        result[f"{key}_exponent_last_two"] = local
        result[f"{key}_at_{target}"] = points[-1][key] * (target / sizes[-1]) ** max(b, local)
    a, b = linear_fit(sizes, [p["peak_rss_mb"] for p in points])
    result["rss_mb_fixed"], result["rss_mb_per_million_rows"] = a, b * 1e6
    result[f"peak_rss_mb_at_{target}"] = a + b * target
    result["peak_rss_mb_at_1000000"] = a + b * 1e6
    return result


# ---- tiling and embedding ---------------------------------------------------------------------------------------


def tiling_section(work: Path, quick: bool) -> dict[str, Any]:
    """bench_tiling's decode limit and ``bony tile`` with 1 and 2 workers, and PANDA's hours on N cores."""
    data = work / "tiling" / "panda"
    slides = 1 if quick else 4
    subprocess.run([sys.executable, "-m", "bonylib", "synth", "panda", str(data), f"panda.slides={slides}", "workers=2"],
                   check=True, capture_output=True)
    variants = ["decode_limit", "bony_1_worker"] + ([] if quick else ["bony_2_workers"])
    runs = {name: bench_tiling._in_child(name, data) for name in variants}
    kept = runs["bony_1_worker"]["kept_tiles"]
    per_worker = {1: kept / runs["bony_1_worker"]["seconds"]}
    if "bony_2_workers" in runs:
        per_worker[2] = kept / runs["bony_2_workers"]["seconds"] / 2
    efficiency = per_worker.get(2, per_worker[1]) / per_worker[1]
    hours = {cores: SEED_TILES / (per_worker[1] * (1 if cores == 1 else cores * efficiency)) / 3600
             for cores in (1, 2, 16, 64)}
    return {"slides": slides, "runs": runs, "kept_tiles_per_s_per_worker": per_worker,
            "decode_limit_ratio_1_worker": runs["decode_limit"]["seconds"] / runs["bony_1_worker"]["seconds"],
            "per_worker_efficiency_2": efficiency, "panda_hours_on_cores": hours,
            "assumption": "kept tiles/s of the synthetic slides; PANDA's 2,852,703 kept tiles; cores beyond 2 keep "
                          "the 2-worker efficiency (measured on this machine's 2 cores only)"}


def embedding_section(quick: bool) -> dict[str, Any]:
    """bench_embed's ``bony embed`` and model limit on this machine's device, and PANDA's hours."""
    manifest = bench_embed._demo_manifest(64 if quick else 512)
    args = argparse.Namespace(encoder=SPEC, device="auto", batch_size=64)
    variants = ("bony_embed",) if quick else ("bony_embed", "model_limit")
    runs = {name: bench_embed._in_child(name, args, manifest) for name in variants}
    rates = {name: r["tiles"] / r["seconds"] for name, r in runs.items()}
    return {"encoder": args.encoder, "runs": runs, "tiles_per_s": rates, "precision": runs["bony_embed"]["precision"],
            "panda_hours_one_device": SEED_TILES / rates["bony_embed"] / 3600,
            "note": "the demo encoder (XCiT-nano); the seed's XCiT-M/16 costs far more per tile"}


# ---- the run ----------------------------------------------------------------------------------------------------


def table(heads: dict[str, list[dict[str, Any]]], fits: dict[str, dict[str, Any]], target: int) -> str:
    lines = [f"{'head':8s}{'rows':>10s}{'seconds':>10s}{'fit s':>9s}{'peak RSS MB':>13s}"]
    for head, points in heads.items():
        for p in points:
            lines.append(f"{head:8s}{p['rows']:>10d}{p['seconds']:>10.1f}{p['fit_seconds']:>9.1f}{p['peak_rss_mb']:>13.0f}")
        fit = fits[head]
        if "seconds_exponent" in fit:
            lines.append(f"{head:8s}{'-> ' + str(target):>10s}{fit[f'seconds_at_{target}']:>10.0f}"
                         f"{fit[f'fit_seconds_at_{target}']:>9.0f}{fit[f'peak_rss_mb_at_{target}']:>13.0f}   projected; "
                         f"time exponent {fit['seconds_exponent']:.2f} (last two {fit['seconds_exponent_last_two']:.2f}), "
                         f"fit {fit['fit_seconds_exponent']:.2f} (last two {fit['fit_seconds_exponent_last_two']:.2f}); "
                         f"RSS {fit['rss_mb_fixed']:.0f} MB + {fit['rss_mb_per_million_rows']:.0f} MB per M rows")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000, 300_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=4096, help="embedding width (the seed's head output: 4096)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="the store's dtype")
    parser.add_argument("--quick", action="store_true", help="few steps, a narrow MLP, one tiling round")
    parser.add_argument("--device", default="cpu", help="where the heads train: cpu, auto (a GPU if there is one), cuda")
    parser.add_argument("--knn-max-rows", type=int, default=300_000, help="largest size k-NN is measured at (0: all)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tile", "embed", *HEADS], help="sections to leave out")
    parser.add_argument("--work", type=Path, default=None, help="folder for the synthetic data (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep each size's data")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "scale.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    # the sibling benchmarks' scratch folders (theirs and their children's) go under work, deleted with it
    (work / "tmp").mkdir(exist_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir = str(work / "tmp")
    try:
        run(args, work)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    """Every size and section of one benchmark call, into ``work``."""
    machine, line = bench_tiling._machine()
    print(f"machine: {line}", flush=True)
    itemsize = np.dtype(args.dtype).itemsize
    heads = {h: [] for h in HEADS if h not in args.skip}
    report: dict[str, Any] = {"machine": machine, "machine_line": line, "dim": args.dim, "dtype": args.dtype,
                              "device": args.device,
                              "quick": args.quick, "protocol": settings(args.quick), "stores": [], "skipped": []}
    for rows in sorted(args.sizes):
        need_gb = rows * args.dim * itemsize / 1e9 * 1.05
        free_gb = shutil.disk_usage(work).free / 1e9
        if free_gb - need_gb < FREE_GB:
            print(f"{rows} rows: skipped, the store needs {need_gb:.1f} GB and {free_gb:.1f} GB are free "
                  f"(at least {FREE_GB:.0f} GB stay free)", flush=True)
            report["skipped"].append({"rows": rows, "need_gb": need_gb, "free_gb": free_gb})
            continue
        folder = work / f"rows-{rows}"
        data = write_data(folder, rows, args.dim, args.dtype)
        store = {"rows": rows, "slides": data["slides"], "gb": rows * args.dim * itemsize / 1e9,
                 "write_s": data["write_s"], "verify_s": data["verify_s"]}
        report["stores"].append(store)
        print(f"{rows} rows ({data['slides']} slides): store {store['gb']:.2f} GB written in {data['write_s']:.1f} s, "
              f"verified once in {data['verify_s']:.1f} s", flush=True)
        for head in heads:
            if head == "knn" and args.knn_max_rows and rows > args.knn_max_rows:
                continue
            cfg = config(data, head, args.dtype, args.quick, args.device, folder / f"{head}.yaml")
            point = {"rows": rows, **measure(data, head, cfg)}
            heads[head].append(point)
            print(f"  {head:7s} {point['seconds']:8.1f} s (fit {point['fit_seconds']:.1f} s), "
                  f"peak RSS {point['peak_rss_mb']:.0f} MB", flush=True)
        if not args.keep:
            shutil.rmtree(folder)
    fits = {head: growth(points, SEED_TILES) for head, points in heads.items()}
    report.update(heads=heads, growth=fits)
    print(f"\nbony evaluate per head, {args.dim}-d {args.dtype} store; projection to PANDA's {SEED_TILES:,} tiles:")
    print(table(heads, fits, SEED_TILES))
    if max(args.sizes) < 300_000:
        print("(below 300 k rows the blocks and batches are still filling up: memory per row is overstated, and "
              "fixed costs flatten the time exponents)")
    if "tile" not in args.skip:
        report["tile"] = tiling_section(work, args.quick)
        t = report["tile"]
        print(f"\nbony tile: {t['kept_tiles_per_s_per_worker'][1]:.1f} kept tiles/s with 1 worker "
              f"({t['decode_limit_ratio_1_worker']:.2f} of the decode limit), per-worker efficiency with 2: "
              f"{t['per_worker_efficiency_2']:.2f}; PANDA ({SEED_SLIDES:,} slides): "
              + ", ".join(f"{h:.2g} h on {c} cores" for c, h in t["panda_hours_on_cores"].items()))
    if "embed" not in args.skip:
        report["embed"] = embedding_section(args.quick)
        e = report["embed"]
        limit = e["tiles_per_s"].get("model_limit")
        print(f"bony embed ({e['encoder']}, {e['precision']}): {e['tiles_per_s']['bony_embed']:.1f} tiles/s"
              + (f" (model limit {limit:.1f})" if limit else "")
              + f"; PANDA: {e['panda_hours_one_device']:.1f} h on one such device")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
