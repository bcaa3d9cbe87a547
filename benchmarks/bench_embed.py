"""Embedding throughput: `bony embed` against a naive eager loop and the encoder's own limit, in one run.

    python benchmarks/bench_embed.py [--manifest M] [--encoder random:xcit_nano_12_p16_224:0] [--tiles 512]
                                     [--device auto] [--repeats 3] [--json benchmarks/results/embed.json]

All rates are tiles per second over the same tiles of a manifest (by default a synthetic PANDA set
tiled here: 4 demo-size slides):

- naive: one tile at a time, the way a notebook would: OpenSlide ``read_region`` of the tile, PIL
  resize and normalisation, the model in eager fp32 under ``no_grad``, the feature moved to numpy;
- bony embed: the store (batched DataLoader with workers, ``inference_mode``, the precision
  ``auto`` resolves on this machine, chunks written to disk), into a fresh folder;
- model limit: the encoder alone on a random batch already on the device, in bony's precision and
  batch size: what any embedder of this encoder must at least spend; bony's ratio to it is the share
  of time spent on the model rather than on reading and writing.

Each variant runs in its own process, which reports its peak resident memory (and peak GPU memory);
variants run in turn ``--repeats`` times and the median time is kept, so that load from other
programs hits them alike. Target: bony ≥ 1.5x naive on a CPU. The machine is printed and saved with
the results: the ratios depend on it.
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


def _peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def _gpu_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _encoder(spec: str, device: str):  # noqa: ANN202 - an Encoder, imported late on purpose
    from bonylib.models.registry import encoder_from_spec
    from bonylib.runtime import resolve_device

    return encoder_from_spec(spec).to(resolve_device(device))


def naive(manifest: Path, spec: str, device: str, batch_size: int) -> dict[str, Any]:
    """One tile at a time: read_region, PIL resize, normalise, eager fp32 forward, to numpy."""
    import numpy as np
    import openslide
    import pandas as pd
    import torch

    encoder = _encoder(spec, device)
    model = encoder.module
    target = next(model.parameters()).device
    frame = pd.read_parquet(manifest)
    mean, std = torch.tensor(encoder.mean).view(3, 1, 1), torch.tensor(encoder.std).view(3, 1, 1)
    start, features = time.perf_counter(), []
    with torch.no_grad():
        for row in frame.itertuples():
            with openslide.OpenSlide(str(row.path)) as slide:
                region = slide.read_region((int(row.x), int(row.y)), int(row.level), (int(row.size), int(row.size)))
            image = region.convert("RGB").resize((encoder.input_size, encoder.input_size))
            pixels = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)
            features.append(model(((pixels - mean) / std)[None].to(target)).cpu().numpy())
    return {"seconds": time.perf_counter() - start, "tiles": len(features), "peak_mb": _peak_mb(),
            "gpu_peak_mb": _gpu_peak_mb(), "precision": "fp32"}


def bony(manifest: Path, spec: str, device: str, batch_size: int) -> dict[str, Any]:
    """`bony embed` into a fresh store."""
    from bonylib.config import load_config
    from bonylib.evaluation.embeddings import EmbedConfig, embed

    cfg = load_config(EmbedConfig, None, [f"device={device}", f"batch_size={batch_size}"])
    encoder = _encoder(spec, device)
    out = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    start = time.perf_counter()
    result = embed(manifest, encoder, out, cfg=cfg)
    seconds = time.perf_counter() - start
    meta = json.loads((result.store / "meta.json").read_text())
    return {"seconds": seconds, "tiles": meta["rows"], "peak_mb": _peak_mb(), "gpu_peak_mb": _gpu_peak_mb(),
            "precision": meta["precision"], "precision_reason": meta["precision_reason"]}


def model_limit(manifest: Path, spec: str, device: str, batch_size: int) -> dict[str, Any]:
    """The encoder alone on random batches already on the device, as many tiles as the manifest has."""
    import dataclasses

    import pandas as pd
    import torch

    from bonylib.runtime import plan_threads, resolve_device, resolve_precision

    target = resolve_device(device)
    plan_threads("auto", gpu=target.type == "cuda").apply()
    encoder = _encoder(spec, device)
    encoder = dataclasses.replace(encoder, precision=resolve_precision("auto", target))
    tiles = len(pd.read_parquet(manifest, columns=["slide_id"]))
    batch = torch.randn(batch_size, 3, encoder.input_size, encoder.input_size, device=target)
    encoder.embed(batch[:2])  # warm-up: first-call allocations and kernel selection
    if target.type == "cuda":
        torch.cuda.synchronize()
    start, done = time.perf_counter(), 0
    while done < tiles:
        n = min(batch_size, tiles - done)
        encoder.embed(batch[:n])
        done += n
    if target.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "tiles": done, "peak_mb": _peak_mb(), "gpu_peak_mb": _gpu_peak_mb(),
            "precision": encoder.precision.name}


VARIANTS = {"naive": naive, "bony_embed": bony, "model_limit": model_limit}


def _machine() -> tuple[dict[str, Any], str]:
    """The machine record and its one-line description, from a child (it imports torch, which would
    otherwise count in every variant's peak memory)."""
    code = ("import json; from bonylib.runtime import describe_machine, machine_record; "
            "r = machine_record(); print(json.dumps([r, describe_machine(r)]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    record, line = json.loads(done.stdout)
    return record, line


def _in_child(name: str, args: argparse.Namespace, manifest: Path) -> dict[str, Any]:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_embed as b; "
            f"print(json.dumps(b.VARIANTS[{name!r}](b.Path({str(manifest)!r}), {args.encoder!r}, {args.device!r}, "
            f"{args.batch_size})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _demo_manifest(tiles: int) -> Path:
    """A synthetic PANDA set at demo size, tiled, cut to ``tiles`` rows (made once per call)."""
    import pandas as pd

    folder = Path(tempfile.mkdtemp(prefix="bench-embed-data-"))
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "bonylib", "synth", "panda", str(folder / "panda"), "--config",
                    str(root / "configs/synth/demo.yaml"), "panda.slides=4"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "bonylib", "tile", str(folder / "panda"), "--format", "panda", "--out",
                    str(folder / "tiles")], check=True, capture_output=True)
    frame = pd.read_parquet(folder / "tiles" / "manifest.parquet")
    path = folder / "tiles" / "bench.parquet"
    frame.head(tiles).to_parquet(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, help="a tile manifest (default: synthetic PANDA tiled here)")
    parser.add_argument("--tiles", type=int, default=512, help="tiles of the default manifest")
    parser.add_argument("--encoder", default="random:xcit_nano_12_p16_224:0", help="bony embed --encoder spec")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "embed.json")
    args = parser.parse_args()
    record, line = _machine()
    print(f"machine: {line}")
    manifest = args.manifest or _demo_manifest(args.tiles)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for round_ in range(args.repeats):
        for name in VARIANTS:
            runs[name].append(_in_child(name, args, manifest))
            print(f"  round {round_ + 1}: {name:12s} {runs[name][-1]['seconds']:.2f} s", flush=True)
    results = {}
    for name, variant_runs in runs.items():
        median = sorted(variant_runs, key=lambda r: r["seconds"])[(len(variant_runs) - 1) // 2]
        results[name] = {**median, "tiles_per_s": median["tiles"] / median["seconds"],
                         "all_seconds": [r["seconds"] for r in variant_runs]}
    rate = {name: r["tiles_per_s"] for name, r in results.items()}
    ratios = {"bony_vs_naive": rate["bony_embed"] / rate["naive"], "bony_vs_model_limit": rate["bony_embed"] / rate["model_limit"]}
    print(f"\n{'variant':12s} {'tiles/s':>9s} {'peak RSS MB':>12s} {'peak GPU MB':>12s}  precision")
    for name, r in results.items():
        gpu = f"{r['gpu_peak_mb']:.0f}" if r["gpu_peak_mb"] is not None else "-"
        print(f"{name:12s} {r['tiles_per_s']:9.1f} {r['peak_mb']:12.0f} {gpu:>12s}  {r['precision']}")
    print(f"\nbony embed = {ratios['bony_vs_naive']:.2f}x naive (target >= 1.5 on a CPU), "
          f"{ratios['bony_vs_model_limit']:.2f} of the model limit; spread over rounds: "
          f"{statistics.pstdev(results['bony_embed']['all_seconds']):.2f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": record, "machine_line": line, "encoder": args.encoder,
                                     "batch_size": args.batch_size, "tiles": results["bony_embed"]["tiles"],
                                     "results": results, "ratios": ratios}, indent=2) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
