"""DINO training-step throughput: bony's step against the paper's pseudo-code, and against the hardware.

    python benchmarks/bench_train_step.py [--backbone xcit_nano_12_p16_224] [--batch 16] [--out-dim 4096]
        [--hidden-dim 2048 --bottleneck-dim 256]
        [--global-crops 2 --global-size 112 --local-crops 4 --local-size 48] [--steps 5]
        [--precisions fp32 bf16 auto] [--json benchmarks/results/train_step.json] [--trials compile contiguous]
        [--dinov2] [--repeats 1]

In one run on the same machine and the same backbone, head and crops:

- bony in each precision of ``--precisions``: the trainer's own step (``Trainer._forward_backward`` +
  ``_optimizer_step``): one backbone pass per crop resolution, autocast, channels-last convolutions,
  foreach AdamW, EMA teacher. ``auto`` is what every recipe runs: the precision resolved from this
  machine's hardware (bonylib.runtime), so its row says what a user gets here;
- naive: the paper's pseudo-code in eager fp32: every crop through the student separately, each
  global crop through the teacher separately, plain AdamW, a per-parameter EMA loop;
- dinov2 (with ``--dinov2``): bony's step under ``auto`` with ``objective: dinov2`` at its defaults (iBOT on
  block-masked global crops with the shared head, KoLeo, Sinkhorn-Knopp centering), masks drawn as the data pipeline
  draws them; its images/s over DINO's under ``auto`` is the price of the new terms (issue 23: at least 0.75);
- limit: the machine's measured matmul rate in the precision each variant actually ran, used for its
  model-FLOP utilisation (MFU = FLOP per step x steps/s / matmul rate; above 100 % would be a bug).
  FLOP per step are counted by ``torch.utils.flop_counter`` on bony's step (the same in every precision).

Prints and saves the machine (CPU model, torch's CPU capability, GPU), images/s, each bony variant's
ratio to naive (target >= 1.3 under auto), MFU and peak memory. With ``--repeats n`` every variant runs n times, the
variants taking turns round by round, and each keeps its median run: on a machine shared with other jobs a load that
comes and goes then falls on every variant alike.
"""

from __future__ import annotations

import argparse
import json
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

from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config
from bonylib.runtime import describe_machine, machine_record, matmul_rate
from bonylib.ssl.data import Batch
from bonylib.ssl.trainer import Trainer


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trainer(args: argparse.Namespace, precision: str, *overrides: str) -> Trainer:
    folder = Path(tempfile.mkdtemp(prefix="bench-step-"))
    for i in range(args.batch):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (args.global_size, args.global_size, 3), np.uint8)).save(
            folder / f"{i}.png")
    cfg = load_config(PretrainConfig, None, [
        f"model.backbone={args.backbone}", f"model.out_dim={args.out_dim}", f"model.hidden_dim={args.hidden_dim}",
        f"model.bottleneck_dim={args.bottleneck_dim}", f"crops.global_crops={args.global_crops}",
        f"crops.global_size={args.global_size}", f"crops.local_crops={args.local_crops}",
        f"crops.local_size={args.local_size}", f"optim.batch_size={args.batch}", f"optim.precision={precision}",
        f"data.images={folder}", "data.workers=0", "optim.epochs=1000", "optim.warmup_epochs=0", *overrides,
    ])
    return build_trainer(cfg, folder / "run")


def _crops(args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sizes = [args.global_size] * args.global_crops + [args.local_size] * args.local_crops
    return [torch.randn(args.batch, 3, s, s, generator=g).to(device) for s in sizes]


DINOV2 = ("objective=dinov2", "loss.centering=sinkhorn_knopp")
"""The DINOv2-style variant: DINOv2's terms at their default weights (iBOT 1, KoLeo 0.1) and its centering."""


def _masks(trainer: Trainer, batch: int) -> torch.Tensor | None:
    """A batch's iBOT masks as the data pipeline draws them (seeded), crop by crop; None for a DINO run."""
    masking = trainer._masking()
    if masking is None:
        return None
    torch.manual_seed(0)
    per_image = [masking(trainer.cfg.crops.global_crops) for _ in range(batch)]
    return torch.cat([torch.stack([m[i] for m in per_image]) for i in range(trainer.cfg.crops.global_crops)])


def bony_step(trainer: Trainer, crops: list[torch.Tensor], masks: torch.Tensor | None = None) -> None:
    trainer._set_schedules(trainer.step)
    trainer._forward_backward(Batch(crops, masks), epoch=1, sync=True, metrics=None)
    trainer._optimizer_step(epoch=1)
    trainer.step += 1


def naive_step(trainer: Trainer, crops: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Algorithm 1 of the paper, literally: crop by crop, fp32, python loops."""
    student, teacher = trainer.model.student_network, trainer.model.teacher
    loss_fn = trainer.model.objectives["dino"]
    center = loss_fn.centering.center
    n_global = trainer.cfg.crops.global_crops
    student_out = [student.head(student.backbone(c)) for c in crops]
    with torch.no_grad():
        teacher_out = [teacher.head(teacher.backbone(c)) for c in crops[:n_global]]
    temp = loss_fn.teacher_temperature(1)
    total, pairs = 0.0, 0
    for t, t_out in enumerate(teacher_out):
        p_t = F.softmax((t_out - center) / temp, dim=-1)
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
        center.mul_(0.9).add_(torch.cat(teacher_out).mean(0, keepdim=True), alpha=0.1)
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


def matmul_limit(precision: str, device: torch.device) -> float:
    """This machine's practical limit in ``precision``: a large matmul's FLOP/s (1024 on CPUs, 8192 on GPUs),
    timed for at least a second."""
    return matmul_rate(precision, device.type, n=8192 if device.type == "cuda" else 1024, min_s=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="xcit_nano_12_p16_224")
    parser.add_argument("--out-dim", type=int, default=4096)
    parser.add_argument("--hidden-dim", type=int, default=2048, help="the head's MLP width (the demo recipe: 512)")
    parser.add_argument("--bottleneck-dim", type=int, default=256, help="the head's bottleneck (the demo recipe: 128)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--global-crops", type=int, default=2)
    parser.add_argument("--global-size", type=int, default=112)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--local-size", type=int, default=48)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "auto"], choices=["fp32", "bf16", "fp16", "auto"],
                        help="bony's step in each of these (fp32 is always timed: it counts the FLOP)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/train_step.json"))
    parser.add_argument("--trials", nargs="*", default=[], choices=["compile", "contiguous"],
                        help="also time bony's step with torch.compile'd backbones, or with contiguous (not "
                             "channels-last) convolutions")
    parser.add_argument("--dinov2", action="store_true",
                        help="also time the step with objective=dinov2 (iBOT, KoLeo, Sinkhorn-Knopp) under auto")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of every variant, taken in turns; each variant keeps its median round")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_variant(args)))
        return
    machine = machine_record()
    print(f"{args.backbone}, {args.global_crops}x{args.global_size} + {args.local_crops}x{args.local_size} crops, "
          f"batch {args.batch}, on {describe_machine(machine)}", flush=True)
    precisions = list(dict.fromkeys(["fp32", *args.precisions]))
    rounds: dict[str, list[dict[str, Any]]] = {}
    # each variant in its own process: peak memory is its own, and no variant inherits another's threads or caches
    for round_ in range(args.repeats):
        for variant in ["naive", *(f"bony_{p}" for p in precisions), *(["dinov2"] if args.dinov2 else []), *args.trials]:
            command = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{variant} failed:\n{done.stderr}")
            rounds.setdefault(variant, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  round {round_ + 1}: {variant:<12} {rounds[variant][-1]['images_per_s']:8.1f} images/s  "
                  f"({rounds[variant][-1]['precision']})", flush=True)
    runs = {variant: sorted(found, key=lambda r: r["images_per_s"])[len(found) // 2] | {
        "images_per_s_rounds": [r["images_per_s"] for r in found]} for variant, found in rounds.items()}
    naive, flop = runs["naive"], runs["bony_fp32"]["flop_per_step"]
    variants = {}
    for name, run in runs.items():
        achieved = flop * run["images_per_s"] / args.batch
        variants[name] = run | {"achieved_flop_per_s": achieved, "mfu": achieved / run["matmul_limit"],
                                "ratio_vs_naive": run["images_per_s"] / naive["images_per_s"]}
    report = {
        "machine": machine, "args": {k: v for k, v in vars(args).items() if k != "variant"} | {"json": str(args.json)},
        "flop_per_step": flop, "variants": variants,
        "auto_resolves_to": runs.get("bony_auto", {}).get("precision"),
        "ratio_auto_vs_naive": variants["bony_auto"]["ratio_vs_naive"] if "bony_auto" in variants else None,
        "target_auto_vs_naive": 1.3,
        "ratio_dinov2_vs_dino": (variants["dinov2"]["images_per_s"] / variants["bony_auto"]["images_per_s"]
                                 if "dinov2" in variants and "bony_auto" in variants else None),
        "target_dinov2_vs_dino": 0.75,
    }
    print(f"model FLOP/step {flop / 1e9:.1f} G; peak memory is {'GPU allocated' if machine['gpu'] else 'process RSS'}")
    print(f"{'variant':<12} {'precision':<9} {'images/s':>9} {'vs naive':>9} {'GFLOP/s':>8} {'limit':>8} {'MFU':>7} {'peak MB':>8}")
    for name, v in variants.items():
        print(f"{name:<12} {v['precision']:<9} {v['images_per_s']:9.1f} {v['ratio_vs_naive']:8.2f}x "
              f"{v['achieved_flop_per_s'] / 1e9:8.1f} {v['matmul_limit'] / 1e9:8.1f} {v['mfu']:7.1%} {v['peak_mb']:8.0f}")
    if "bony_auto" in variants:
        print(f"auto runs {report['auto_resolves_to']} here ({runs['bony_auto']['reason']}): "
              f"{report['ratio_auto_vs_naive']:.2f}x naive (target >= 1.3)")
    if report["ratio_dinov2_vs_dino"] is not None:
        print(f"dinov2 (iBOT + KoLeo + Sinkhorn-Knopp): {report['ratio_dinov2_vs_dino']:.2f}x DINO's images/s under "
              f"auto (target >= 0.75)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.json}")


def _apply_trial(trainer: Trainer, trial: str) -> None:
    """What each trial changes in bony's step (in the precision ``auto`` resolves to): the backbones
    compiled (inductor; the warm-up steps absorb compilation, one graph per crop size), or weights and
    crops back in contiguous memory format (what ``model.channels_last=false`` runs)."""
    if trial == "contiguous":
        trainer.cfg.model.channels_last = False
    for model in (trainer.model.student_network, trainer.model.teacher):
        if trial == "compile":
            model.backbone.forward_features = torch.compile(model.backbone.forward_features)
        else:
            model.to(memory_format=torch.contiguous_format)


def _variant(args: argparse.Namespace) -> dict[str, Any]:
    """One variant's images/s, the precision it ran, the matmul limit in that precision (and, for bony in
    fp32, the FLOP per step), in this process."""
    if args.variant == "naive":
        precision = "fp32"
    elif args.variant in args.trials or args.variant == "dinov2":
        precision = "auto"
    else:
        precision = args.variant.removeprefix("bony_")
    trainer = _trainer(args, precision, *(DINOV2 if args.variant == "dinov2" else ()))
    device = trainer.device
    crops = _crops(args, device)
    masks = _masks(trainer, args.batch)
    result: dict[str, Any] = {"precision": trainer.precision.name, "reason": trainer.precision.reason,
                              "threads": trainer.threads.torch_threads}
    if args.variant == "naive":
        _apply_trial(trainer, "contiguous")  # the pseudo-code as written: default memory format
        optimizer = torch.optim.AdamW(trainer.model.student_network.parameters(), lr=1e-4, foreach=False)
        result["images_per_s"] = _rate(lambda: naive_step(trainer, crops, optimizer), args.warmup, args.steps,
                                       args.batch, device)
    else:
        if args.variant in args.trials:
            _apply_trial(trainer, args.variant)
        result["images_per_s"] = _rate(lambda: bony_step(trainer, crops, masks), args.warmup, args.steps, args.batch,
                                       device)
    if args.variant == "bony_fp32":
        with FlopCounterMode(display=False) as counter:
            bony_step(trainer, crops)
        result["flop_per_step"] = counter.get_total_flops()
    result["matmul_limit"] = matmul_limit(trainer.precision.name, device)
    result["peak_mb"] = _peak_mb(device)
    return result


if __name__ == "__main__":
    main()
