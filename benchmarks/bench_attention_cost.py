"""Forward time and peak memory of ViT self-attention against XCiT's XCA as the tile grows, with fitted exponents.

    python benchmarks/bench_attention_cost.py [--sides 224 320 448 640 896 1024 1280 1536] [--dim 192] [--heads 4]
        [--repeats 5] [--threads 1] [--min-tokens 1024] [--device cpu] [--json benchmarks/results/attention_cost.json]

One attention layer of each kind (explicit self-attention, fused self-attention, XCA: see
:mod:`bonylib.models.attention_cost`) runs on the patch tokens of one tile of each side (patch 16).
Times are medians of ``--repeats`` forwards; memory is the peak allocated during one forward. The exponent
of each is the slope of a least-squares line in log-log space over the sizes with at least
``--min-tokens`` tokens. Expect about 2 for self-attention's time and for its explicit memory, about 1
for XCA's and for the fused kernel's memory. Times on a shared CPU are noisy (two runs of one size may
differ by tens of percent when a neighbour is busy); the memory figures are exact and repeatable. On the
CPU the layers run on ``--threads`` threads, one by default: on a shared machine more threads wait for
each other at every op, which adds the same delay at every size and flattens the curves (see the module).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bonylib.models.attention_cost import DEFAULT_SIDES, MECHANISMS, fit_exponents, measure_attention_cost
from bonylib.runtime import describe_machine, machine_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=list(DEFAULT_SIDES), help="tile sides (px)")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per size (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while measuring")
    parser.add_argument("--min-tokens", type=int, default=1024, help="fit the exponents from this many tokens up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/attention_cost.json"))
    args = parser.parse_args()
    machine = machine_record()
    print(f"attention layers {args.dim} wide, {args.heads} heads, patch {args.patch}, on {args.device}: "
          f"{describe_machine(machine)}; {args.threads} torch thread(s)", flush=True)
    table = measure_attention_cost(args.sides, dim=args.dim, heads=args.heads, patch=args.patch,
                                   repeats=args.repeats, device=args.device, threads=args.threads)
    exponents = fit_exponents(table, args.min_tokens)
    shown = table.assign(time_ms=1000 * table["time_s"], peak_mib=table["peak_bytes"] / 2**20)
    print(shown.pivot(index=["side", "tokens"], columns="mechanism", values=["time_ms", "peak_mib"])
          .round(2).to_string())
    print(f"\nexponents (least squares in log-log space, tokens >= {args.min_tokens}):")
    for row in exponents.itertuples():
        print(f"  {MECHANISMS[row.mechanism]:<36} {row.quantity:<10} N^{row.exponent:.2f} ({row.points} sizes)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in vars(args).items()},
                                     "rows": table.to_dict(orient="records"),
                                     "exponents": exponents.to_dict(orient="records")}, indent=2) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
