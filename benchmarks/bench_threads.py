"""How to split a CPU between torch's threads and the DataLoader's workers, on the real training loop.

    python benchmarks/bench_threads.py [--manifest runs/demo/tiles/panda/manifest.parquet]
        [--splits 2:0 2:1 2:2 1:1] [--steps 25] [--repeats 2] [--json benchmarks/results/threads.json]

Each split ``THREADS:WORKERS`` runs the demo recipe (configs/pretrain/demo.yaml: data loading, multi-crop
augmentations, step, EMA) for ``--steps`` optimisation steps in its own process, in the precision
``auto`` resolves to, and reports the steady images/s (the first logged interval, with the workers'
start-up, is left out). ``auto`` is timed too: the split :func:`bonylib.runtime.plan_threads` picks for
this machine, which should be the best row. The splits run in ``--repeats`` alternating rounds and each
reports its median, since two runs of one split on a 2-core machine differ by up to 10 %. Without
``--manifest`` the images are 224 px JPEGs of noise (decoding and augmenting them costs about what
tissue tiles do).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config
from bonylib.runtime import describe_machine, machine_record, plan_threads

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "demo.yaml"


def _noise_images(count: int = 512) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, (224, 224, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return folder


def _split(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``--steps`` steps with the split ``args.split`` in this process; its steady images/s."""
    threads, _, workers = args.split.partition(":")
    source = f"data.manifest={args.manifest}" if args.manifest else f"data.images={args.images}"
    out = Path(tempfile.mkdtemp(prefix="bench-threads-run-"))
    cfg = load_config(PretrainConfig, RECIPE, [source, f"data.workers={workers}", f"max_steps={args.steps}",
                                               "log_every=5", "tensorboard=false", "checkpoint_every=100000"])
    trainer = build_trainer(cfg, out)
    if threads != "auto":
        torch.set_num_threads(int(threads))
    trainer.train()
    rates = [r["images_per_s"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
             if "images_per_s" in r][1:]
    return {"torch_threads": torch.get_num_threads(), "workers": trainer.threads.workers,
            "precision": trainer.precision.name, "images_per_s": float(np.median(rates))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, help="a tile manifest (default: JPEGs of noise)")
    parser.add_argument("--splits", nargs="+", default=["2:0", "2:1", "2:2", "1:1"], help="THREADS:WORKERS")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds over the splits (medians)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/threads.json"))
    parser.add_argument("--split", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.split:
        print(json.dumps(_split(args)))
        return
    machine = machine_record()
    plan = plan_threads()
    print(f"demo recipe, {args.steps} steps per split, on {describe_machine(machine)}")
    print(f"auto plans {plan.torch_threads} torch threads + {plan.workers} workers", flush=True)
    images = [] if args.manifest else ["--images", str(_noise_images())]
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(args.repeats):
        for split in [*args.splits, "auto:auto"]:
            command = [sys.executable, __file__, *sys.argv[1:], *images, "--split", split]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"split {split} failed:\n{done.stderr}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            runs.setdefault(split, []).append(r)
            print(f"  round {round_ + 1}: {split:<10} {r['torch_threads']} threads + {r['workers']} workers "
                  f"({r['precision']}): {r['images_per_s']:6.1f} images/s", flush=True)
    results = {split: rs[0] | {"images_per_s": float(np.median([r["images_per_s"] for r in rs])),
                               "rounds": [r["images_per_s"] for r in rs]} for split, rs in runs.items()}
    for split, r in results.items():
        print(f"{split:<10} median {r['images_per_s']:6.1f} images/s over {args.repeats} rounds")
    best = max(args.splits, key=lambda s: results[s]["images_per_s"])
    auto = results["auto:auto"]["images_per_s"]
    print(f"best fixed split {best}: {results[best]['images_per_s']:.1f} images/s; auto {auto:.1f} "
          f"({auto / results[best]['images_per_s']:.2f} of the best)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "steps": args.steps, "repeats": args.repeats,
                                     "manifest": str(args.manifest or ""),
                                     "splits": results, "best": best}, indent=2) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
