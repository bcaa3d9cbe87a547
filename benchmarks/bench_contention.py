"""The training step on a busy machine: 0, 1, 2 ... other processes spinning on the CPUs.

torch's OpenMP threads meet at a barrier after every op, so when another process keeps a core busy, the thread
that shares it makes the others wait for its next time slice at every op, and a step of many small ops (XCiT-nano
on the demo's crops) collapses. This script times the demo recipe's real step (``bench_train_step.bony_step``, fp32)
with N competing busy processes for each N of ``--contend``, three ways:

- ``all threads``: torch on every usable CPU whatever the load (what Bony did before it measured the load);
- ``one thread``;
- ``bony``: the count ``runtime.plan_threads`` picks from ``runtime.busy_cpus`` measured with the competitors running.

Each is printed as images/s and as a ratio to the idle machine's best (the limit this machine reaches for the step);
the issue's target is >= 0.40 of idle with one competitor on a 2-core CPU. The machine (CPU model, torch's CPU
capability) is printed and saved with the numbers in ``benchmarks/results/contention.json``. Run it on an otherwise
quiet machine: the competitors are the only load it means to measure.

    python benchmarks/bench_contention.py [--contend 0 1 2] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import _crops, _trainer, bony_step  # noqa: E402

from bonylib.runtime import busy_cpus, describe_machine, machine_record, plan_threads, usable_cpus  # noqa: E402


SPIN = "while True: pass"


def _competitor() -> subprocess.Popen:
    """A process keeping one core busy that is not a child of this one (bash starts it, in a session of its own): the
    load meter counts this process's children as its own work, as it should for DataLoader workers."""
    return subprocess.Popen(["bash", "-c", f'"{sys.executable}" -c "$0"; true', SPIN], start_new_session=True)


def _rate(trainer, crops: list[torch.Tensor], threads: int, seconds: float, batch: int) -> float:
    """Images per second of the step on ``threads`` torch threads, over ``seconds`` after one warm-up step."""
    torch.set_num_threads(threads)
    bony_step(trainer, crops)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        bony_step(trainer, crops)
        steps += 1
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contend", type=int, nargs="+", default=[0, 1, 2], help="competing busy processes")
    parser.add_argument("--seconds", type=float, default=20.0, help="timing per configuration")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/contention.json"))
    args = parser.parse_args()
    demo = argparse.Namespace(backbone="xcit_nano_12_p16_224", out_dim=256, hidden_dim=512, bottleneck_dim=128,
                              global_crops=2, global_size=96, local_crops=4, local_size=48, batch=16)
    print(describe_machine())
    cpus = usable_cpus()
    trainer = _trainer(demo, "fp32", "data.workers=0")
    crops = _crops(demo, torch.device("cpu"))
    rows = []
    for count in sorted(set(args.contend)):
        competitors = [_competitor() for _ in range(count)]
        time.sleep(1.0)
        try:
            busy = busy_cpus(1.0)
            plan = plan_threads(0, cpus, busy=busy)
            row = {"competitors": count, "busy_cpus": round(busy, 2), "bony_threads": plan.torch_threads,
                   "bony_reason": plan.reason}
            for name, threads in (("all threads", cpus), ("one thread", 1), ("bony", plan.torch_threads)):
                row[name] = _rate(trainer, crops, threads, args.seconds, demo.batch)
        finally:
            for process in competitors:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        rows.append(row)
        print(f"{count} competitors (busy {busy:.2f} CPUs): all threads ({cpus}) {row['all threads']:.1f}, one thread "
              f"{row['one thread']:.1f}, bony ({plan.torch_threads}) {row['bony']:.1f} images/s", flush=True)
    idle = max(rows[0]["all threads"], rows[0]["one thread"]) if rows[0]["competitors"] == 0 else float("nan")
    print(f"\nratio to the idle machine's best ({idle:.1f} images/s):")
    for row in rows:
        print(f"  {row['competitors']} competitors: all threads {row['all threads'] / idle:.2f}, one thread "
              f"{row['one thread'] / idle:.2f}, bony {row['bony'] / idle:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_record(), "cpus": cpus, "seconds": args.seconds,
                                     "idle_best": idle, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
