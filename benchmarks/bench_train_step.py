"""DINO training-step throughput: bony's step against the paper's pseudo-code, and against the hardware.

    python benchmarks/bench_train_step.py [--backbone xcit_nano_12_p16_224] [--batch 16]
        [--global-crops 2 --global-size 112 --local-crops 4 --local-size 48] [--steps 5]
        [--json benchmarks/results/train_step.json] [--trials compile contiguous]

In one run on the same machine and the same backbone, head and crops:

- bony: the trainer's own step (``Trainer._forward_backward`` + ``_optimizer_step``): one backbone
  pass per crop resolution, autocast (bf16 by default), channels-last convolutions, foreach AdamW,
  EMA teacher;
- naive: the paper's pseudo-code in eager fp32: every crop through the student separately, each
  global crop through the teacher separately, plain AdamW, a per-parameter EMA loop;
- limit: the machine's measured matmul rate (a large square matmul in the same precision), used
  for the model-FLOP utilisation (MFU = FLOP per step x steps/s / matmul rate). FLOP per step are
  counted by ``torch.utils.flop_counter`` on bony's step.

Prints images/s, the ratio bony/naive (target >= 1.3), MFU and peak memory, and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from bonylib.config import load_config
from bonylib.ssl.trainer import PretrainConfig, Trainer


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trainer(args: argparse.Namespace, precision: str) -> Trainer:
    folder = Path(tempfile.mkdtemp(prefix="bench-step-"))
    for i in range(args.batch):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (args.global_size, args.global_size, 3), np.uint8)).save(
            folder / f"{i}.png")
    cfg = load_config(PretrainConfig, None, [
        f"model.backbone={args.backbone}", f"model.out_dim={args.out_dim}", f"crops.global_crops={args.global_crops}",
        f"crops.global_size={args.global_size}", f"crops.local_crops={args.local_crops}",
        f"crops.local_size={args.local_size}", f"optim.batch_size={args.batch}", f"optim.precision={precision}",
        f"data.images={folder}", "data.workers=0", "optim.epochs=1000", "optim.warmup_epochs=0",
    ])
    return Trainer(cfg, folder / "run")


def _crops(args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sizes = [args.global_size] * args.global_crops + [args.local_size] * args.local_crops
    return [torch.randn(args.batch, 3, s, s, generator=g).to(device) for s in sizes]


def bony_step(trainer: Trainer, crops: list[torch.Tensor]) -> None:
    trainer._set_schedules(trainer.step)
    trainer._forward_backward(crops, epoch=1, sync=True)
    trainer._optimizer_step(epoch=1)
    trainer.step += 1


def naive_step(trainer: Trainer, crops: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Algorithm 1 of the paper, literally: crop by crop, fp32, python loops."""
    student, teacher, loss_fn = trainer._student_module, trainer.teacher, trainer.loss
    n_global = trainer.cfg.crops.global_crops
    student_out = [student(c) for c in crops]
    with torch.no_grad():
        teacher_out = [teacher(c) for c in crops[:n_global]]
    temp = loss_fn.teacher_temperature(1)
    total, pairs = 0.0, 0
    for t, t_out in enumerate(teacher_out):
        p_t = F.softmax((t_out - loss_fn.center) / temp, dim=-1)
        for s, s_out in enumerate(student_out):
            if s == t and n_global > 1:
                continue
            total = total + torch.sum(-p_t * F.log_softmax(s_out / loss_fn.student_temp, dim=-1), dim=-1).mean()
            pairs += 1
    loss = total / pairs
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        loss_fn.center.mul_(0.9).add_(torch.cat(teacher_out).mean(0, keepdim=True), alpha=0.1)
        for ps, pt in zip(student.parameters(), teacher.parameters()):
            pt.data = 0.996 * pt.data + 0.004 * ps.data


def _rate(step: Any, warmup: int, steps: int, batch: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def matmul_peak(precision: str, device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul in the step's precision: this machine's practical limit."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="xcit_nano_12_p16_224")
    parser.add_argument("--out-dim", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--global-crops", type=int, default=2)
    parser.add_argument("--global-size", type=int, default=112)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--local-size", type=int, default=48)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/train_step.json"))
    parser.add_argument("--trials", nargs="*", default=[], choices=["compile", "contiguous"],
                        help="also time bony's step with torch.compile'd backbones, or with contiguous (not "
                             "channels-last) convolutions")
    parser.add_argument("--variant", choices=["naive", "bony", "compile", "contiguous"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_variant(args)))
        return
    runs = {}
    for variant in ("naive", "bony", *args.trials):  # each in its own process: peak memory is its own
        command = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{variant} failed:\n{done.stderr}")
        runs[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    naive, ours = runs["naive"], runs["bony"]
    achieved = ours["flop_per_step"] * ours["images_per_s"] / args.batch
    report = {
        "device": ours["device"], "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k != "variant"} | {"json": str(args.json)},
        "images_per_s": {"bony": ours["images_per_s"], "naive": naive["images_per_s"]},
        "ratio_bony_vs_naive": ours["images_per_s"] / naive["images_per_s"],
        "flop_per_step": ours["flop_per_step"], "achieved_flop_per_s": achieved,
        "matmul_peak_flop_per_s": ours["matmul_peak"], "mfu": achieved / ours["matmul_peak"],
        "peak_memory_mb": {"naive": naive["peak_mb"], "bony": ours["peak_mb"]},
        "trials": {t: {"images_per_s": runs[t]["images_per_s"], "ratio_vs_bony": runs[t]["images_per_s"] / ours["images_per_s"],
                       "peak_mb": runs[t]["peak_mb"]} for t in args.trials},
    }
    print(f"{args.backbone}, {args.global_crops}x{args.global_size} + {args.local_crops}x{args.local_size} crops, "
          f"batch {args.batch}, {args.precision}, on {ours['device']} ({os.cpu_count()} CPUs)")
    print(f"naive (fp32, crop by crop): {naive['images_per_s']:8.1f} images/s")
    print(f"bony:                       {ours['images_per_s']:8.1f} images/s   ratio "
          f"{report['ratio_bony_vs_naive']:.2f} (target >= 1.3)")
    print(f"model FLOP/step {ours['flop_per_step'] / 1e9:.1f} G, achieved {achieved / 1e9:.1f} GFLOP/s, "
          f"matmul limit {ours['matmul_peak'] / 1e9:.1f} GFLOP/s, MFU {report['mfu']:.1%}")
    print(f"peak memory: naive {naive['peak_mb']:.0f} MB, bony {ours['peak_mb']:.0f} MB "
          f"({'GPU allocated' if ours['device'] != 'cpu' else 'process RSS'})")
    for trial, result in report["trials"].items():
        print(f"trial {trial}: {result['images_per_s']:.1f} images/s, {result['ratio_vs_bony']:.2f} x bony's step")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.json}")


def _apply_trial(trainer: Trainer, trial: str) -> None:
    """What each trial changes in bony's step: the backbones compiled (inductor; the warm-up steps
    absorb compilation, one graph per crop size), or weights and crops back in contiguous memory
    format (what ``model.channels_last=false`` runs)."""
    if trial == "contiguous":
        trainer.cfg.model.channels_last = False
    for model in (trainer._student_module, trainer.teacher):
        if trial == "compile":
            model.backbone = torch.compile(model.backbone)
        else:
            model.to(memory_format=torch.contiguous_format)


def _variant(args: argparse.Namespace) -> dict[str, Any]:
    """One variant's images/s (and, for bony, FLOP per step and the matmul limit), in this process."""
    trainer = _trainer(args, "fp32" if args.variant == "naive" else args.precision)
    device = trainer.device
    crops = _crops(args, device)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if args.variant == "naive":
        _apply_trial(trainer, "contiguous")  # the pseudo-code as written: default memory format
        optimizer = torch.optim.AdamW(trainer._student_module.parameters(), lr=1e-4, foreach=False)
        result["images_per_s"] = _rate(lambda: naive_step(trainer, crops, optimizer), args.warmup, args.steps,
                                       args.batch, device)
    else:
        if args.variant != "bony":
            _apply_trial(trainer, args.variant)
        result["images_per_s"] = _rate(lambda: bony_step(trainer, crops), args.warmup, args.steps, args.batch, device)
    if args.variant == "bony":
        with FlopCounterMode(display=False) as counter:
            bony_step(trainer, crops)
        result["flop_per_step"] = counter.get_total_flops()
        result["matmul_peak"] = matmul_peak(args.precision, device)
    result["peak_mb"] = _peak_mb(device)
    return result


if __name__ == "__main__":
    main()
