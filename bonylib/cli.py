"""The ``bony`` command: one subcommand per pipeline stage.

Each subcommand takes ``--config FILE`` and ``key=value`` overrides of its config schema (listed
by ``--help``), saves the resolved config beside its outputs, and turns bad input into a one-line
error and a non-zero exit status instead of a traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from bonylib import __version__
from bonylib.config import help_text, load_config
from bonylib.errors import BonyError

log = logging.getLogger("bonylib")

EXIT_BAD_INPUT = 2
EXIT_FAILURES = 3
"""Some items (slides, encoders) failed and were recorded; the rest of the run completed."""
EXIT_PREEMPTED = 143
"""Stopped by SIGTERM/SIGUSR1 after writing a checkpoint (128 + SIGTERM), so SLURM can requeue."""


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``bony synth: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


@dataclass(frozen=True)
class Command:
    """A subcommand: its config schema, extra arguments and the function that runs it."""

    name: str
    summary: str
    schema: type
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Any], int]


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    from bonylib.data.synthetic import DATASETS

    parser.add_argument("dataset", metavar="DATASET", help=f"which dataset to write: {', '.join(DATASETS)} or all")
    parser.add_argument("out", metavar="OUT", type=Path, help="output folder (with 'all': one sub-folder per dataset)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it holds something else")


def _synth_run(args: argparse.Namespace, cfg: Any) -> int:
    from bonylib.data.synthetic import synthesize

    for folder in synthesize(args.dataset, args.out, cfg, overwrite=args.overwrite):
        print(folder)
    return 0


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not 0 <= int(index) < int(count):
        raise argparse.ArgumentTypeError(f"'{text}' is not i/n with 0 <= i < n (e.g. 0/4 for the first of four shards)")
    return int(index), int(count)


def _tile_arguments(parser: argparse.ArgumentParser) -> None:
    from bonylib.data.sources import FORMATS

    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="a dataset folder (--format panda|sicapv2|deepgleason|imagefolder), or slide files and folders "
                        "(--format slides)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: manifest.parquet, parts/, failures.csv, ...")
    parser.add_argument("--format", default="slides", choices=FORMATS, help="how to read INPUT (default: slides)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="tile only every N-th slide starting at I (SLURM array task I of N); "
                        "a final run without --shard assembles the manifest")
    parser.add_argument("--overwrite", action="store_true", help="start again if OUT was tiled with another config")


def _tile_run(args: argparse.Namespace, cfg: Any) -> int:
    from bonylib.data.tiling import tile

    result = tile(args.format, args.inputs, args.out, cfg, shard=args.shard, overwrite=args.overwrite)
    print(f"{result.out}: {result.tiled} slides tiled, {result.skipped} already done, {len(result.failures)} failed")
    if len(result.failures):
        print(f"failed slides are listed in {result.out / 'failures.csv'}", file=sys.stderr)
        return EXIT_FAILURES
    return 0


def _pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="run folder: config.yaml, log.jsonl, checkpoints, the exported teacher; rerun to resume")


def _pretrain_run(args: argparse.Namespace, cfg: Any) -> int:
    from bonylib.compose.pretrain import build_trainer
    from bonylib.ssl.trainer import Preempted

    try:
        print(build_trainer(cfg, args.out).train())
    except Preempted as exc:
        print(f"bony pretrain: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", type=Path, metavar="SWEEP",
                        help="a sweep file (configs/pretrain/sweeps/): a base recipe and its arms, named sets of overrides; "
                        "--config RECIPE replaces the base (the same arms at another scale: configs/pretrain/demo.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the arms' runs: OUT/<arm> each; rerun to resume")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME|INDEX",
                        help="train only this arm, by name or by index in the file (0 first; repeat for several); "
                        "default: every arm in turn")
    parser.add_argument("--print", action="store_true", dest="print_arguments",
                        help="train nothing: print the arm's bony pretrain arguments one per line (CONFIG, OUT, then "
                        "the overrides), as slurm/sweep.sbatch hands them to slurm/pretrain.sbatch; needs one --arm")


def _sweep_run(args: argparse.Namespace, cfg: Any) -> int:
    from bonylib.compose.sweeps import arm_overrides, pick_arm, read_sweep, train_arms
    from bonylib.ssl.trainer import Preempted

    # --config replaces the sweep's base recipe (the demo scale: the same arms on configs/pretrain/demo.yaml); cfg,
    # that recipe with the overrides, has checked the overrides' keys and values before any arm is resolved
    sweep = read_sweep(args.sweep)
    arms = [pick_arm(sweep, which) for which in args.arm]
    if args.print_arguments:
        if len(arms) != 1:
            raise BonyError("--print needs exactly one --arm")
        base = args.config if args.config is not None else sweep.base
        print("\n".join([str(base), str(args.out / arms[0]), *arm_overrides(sweep, arms[0], args.overrides)]))
        return 0
    try:
        for path in train_arms(sweep, args.out, arms, args.config, args.overrides).values():
            print(path)
    except Preempted as exc:
        print(f"bony sweep: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def _embed_arguments(parser: argparse.ArgumentParser) -> None:
    from bonylib.models.encoders import OUTPUTS
    from bonylib.models.registry import spec_forms

    parser.add_argument("manifest", type=Path, metavar="MANIFEST", help="tile manifest.parquet written by bony tile")
    parser.add_argument("--encoder", required=True, metavar="SPEC", help=f"the frozen encoder: {spec_forms()}")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder of stores: the embeddings go to OUT/<encoder fingerprint[:16]>/ (printed); "
                        "rerun to resume")
    parser.add_argument("--output", default="cls", choices=OUTPUTS,
                        help="cls (pooled feature, default), cls+mean (with the mean patch token) or patch "
                        "(patch tokens for the decoders, stored as float16)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="compute only every N-th chunk starting at I (SLURM array task I of N); "
                        "a final run without --shard computes what is left and checks the store")


def _embed_run(args: argparse.Namespace, cfg: Any) -> int:
    from bonylib.evaluation.embeddings import embed
    from bonylib.models.registry import encoder_from_spec

    result = embed(args.manifest, encoder_from_spec(args.encoder), args.out, args.output, cfg, shard=args.shard)
    print(f"{result.store}: {result.computed} chunks computed, {result.skipped} already done, "
          f"{result.missing} left to other shards")
    return 0


def _curate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, metavar="MANIFEST", help="tile manifest.parquet whose tiles to cluster")
    parser.add_argument("--store", type=Path, required=True,
                        help="the bony embed store of MANIFEST's tiles (cls output: OUT/<fingerprint[:16]>)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the curated manifest to write, in MANIFEST's folder (its tile paths are relative to it): "
                        "every row with a cluster column, and a JSON of the clusters beside it")


def _curate_run(args: argparse.Namespace, cfg: Any) -> int:
    from bonylib.compose.curation import curate

    out = curate(args.manifest, args.store, args.out, cfg)
    print(f"{out}: pretrain on it with data.manifest={out} data.balance_by=cluster")
    return 0


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="evaluation folder: embeddings/, runs/ (metrics JSON and predictions per benchmark, head, "
                        "encoder and run), results.csv and results.md; rerun to resume")


def _evaluate_run(args: argparse.Namespace, cfg: Any) -> int:
    from bonylib.evaluation.evaluate import Evaluation

    evaluation = Evaluation(cfg, args.out)
    _, markdown = evaluation.run()
    print(markdown.read_text())
    print(markdown)
    failed = evaluation.not_evaluated
    if failed:
        names = ", ".join(name for name, _ in failed)
        if len(failed) == len(cfg.encoders):
            raise BonyError(f"no encoder could be evaluated ({names}); first: {failed[0][1]}")
        print(f"bony evaluate: {len(failed)} of {len(cfg.encoders)} encoders not evaluated ({names}); {markdown} says why",
              file=sys.stderr)
        return EXIT_FAILURES
    return 0


def _attention_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("encoder", metavar="EXPORT",
                        help="a bony pretrain run folder, or an encoder spec as bony embed takes (random:<arch>:<seed>)")
    parser.add_argument("source", type=Path, metavar="IMAGE_OR_SLIDE",
                        help="an image (JPEG, PNG, plain TIFF: one tile, resized to the encoder's input), a folder "
                        "of them (each mapped, the encoder loaded once) or a slide (tiled into OUT/tiles, or read at "
                        "the tiles of --manifest)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: PNGs, the raw maps as .npy, a JSON")
    parser.add_argument("--block", type=int, default=-1,
                        help="whose CLS attention to draw: a ViT block, or an XCiT class-attention block "
                        "(default -1: the last; the .npy of an image holds every block)")
    parser.add_argument("--threshold", type=float, metavar="FRACTION",
                        help="keep only the top FRACTION of each map's attention mass, in (0, 1], as DINO's figures (e.g. 0.6)")
    parser.add_argument("--manifest", type=Path, help="tile manifest whose rows with this file's path are the tiles "
                        "to map (treats IMAGE_OR_SLIDE as a slide)")
    parser.add_argument("--overwrite", action="store_true",
                        help="tile the slide again into OUT/tiles if it was tiled there with another tile config")


def _attention_run(args: argparse.Namespace, cfg: Any) -> int:
    from bonylib.attention.command import attention

    for path in attention(args.encoder, args.source, args.out, cfg, block=args.block, threshold=args.threshold,
                          manifest=args.manifest, overwrite=args.overwrite):
        print(path)
    return 0


def _import_dino_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                        help="a facebookresearch/dino checkpoint.pth (main_dino.py's, e.g. the seed's checkpoint_4096.pth) "
                        "or a released dino_*_pretrain.pth backbone")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the Bony export (teacher_backbone.safetensors, teacher_head.safetensors, .json): "
                        "then bony:<out> and bony-head:<out> name it")


def _import_dino_run(args: argparse.Namespace, cfg: Any) -> int:
    from bonylib.models.dino_checkpoints import export_dino

    print(export_dino(args.checkpoint, args.out, cfg.network))
    return 0


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder the notebooks read and write (default: runs/demo)")
    parser.add_argument("--book", type=Path, default=Path("."), help="book root, the folder with _config.yml and _toc.yml (default: .)")
    parser.add_argument("--parameters", type=Path, metavar="FILE",
                        help="YAML mapping of papermill parameters for every notebook this call runs (over the config's)")
    parser.add_argument("--only", action="append", default=[], metavar="NN",
                        help="run only this notebook (its number, e.g. 05, or its stem; repeat or comma-separate for "
                        "several), even if up to date, then build the book from every executed copy")
    parser.add_argument("--force", action="store_true",
                        help="run every notebook, even those whose notebook, parameters and run files are unchanged "
                        "(after a change to bonylib itself)")


def _report_run(args: argparse.Namespace, cfg: Any) -> int:
    from bonylib.config import read_mapping
    from bonylib.report import build_report, check_parameters, notebook_paths

    if args.parameters:
        extra = read_mapping(args.parameters)
        check_parameters(extra, str(args.parameters))
        parameters = dict(cfg.parameters)
        for source in notebook_paths(args.book.resolve(), list(cfg.notebooks)):
            parameters[source.stem] = {**parameters.get(source.stem, {}), **extra}
        cfg = replace(cfg, parameters=parameters)  # checked again, whole
    only = [name.strip() for names in args.only for name in names.split(",") if name.strip()]
    index = build_report(args.book, args.run, cfg, only=only, force=args.force)
    print(index)
    return 0


def _commands() -> list[Command]:
    from bonylib.attention.command import AttentionConfig
    from bonylib.compose.pretrain import PretrainConfig
    from bonylib.data.curation import CurateConfig
    from bonylib.data.synthetic import SynthConfig
    from bonylib.data.tiling import TileConfig
    from bonylib.evaluation.embeddings import EmbedConfig
    from bonylib.evaluation.evaluate import EvaluateConfig
    from bonylib.models.dino_checkpoints import DinoImportConfig
    from bonylib.report import ReportConfig

    return [
        Command("synth", "write synthetic PANDA / SICAPv2 / DeepGleason datasets in their real on-disk formats",
                SynthConfig, _synth_arguments, _synth_run),
        Command("tile", "cut slides into tissue tiles with quality measures and mask labels (resumable manifest)",
                TileConfig, _tile_arguments, _tile_run),
        Command("pretrain", "DINO (objective=dinov2: DINOv2-style) self-distillation of an XCiT/ViT on tiles (one CPU, or GPUs with torchrun/srun)",
                PretrainConfig, _pretrain_arguments, _pretrain_run),
        Command("sweep", "the arms of a pretraining experiment (a sweep file: a recipe and named overrides), each a "
                "bony pretrain run", PretrainConfig, _sweep_arguments, _sweep_run),
        Command("embed", "embeddings of a tile manifest by a frozen encoder, written once to a resumable store",
                EmbedConfig, _embed_arguments, _embed_run),
        Command("curate", "cluster a manifest's tiles by their embeddings, for pretraining balanced over the clusters",
                CurateConfig, _curate_arguments, _curate_run),
        Command("evaluate", "frozen-encoder benchmarks (PANDA, DeepGleason, SICAPv2, ISUP) and the results table",
                EvaluateConfig, _evaluate_arguments, _evaluate_run),
        Command("attention", "attention maps of an encoder (ViT, XCiT) over an image, or heatmaps over a slide",
                AttentionConfig, _attention_arguments, _attention_run),
        Command("import-dino", "convert a facebookresearch/dino checkpoint (the seed's models) into a Bony export",
                DinoImportConfig, _import_dino_arguments, _import_dino_run),
        Command("report", "run the numbered notebooks with papermill and build the HTML book",
                ReportConfig, _report_arguments, _report_run),
    ]


def build_parser() -> argparse.ArgumentParser:
    """The full ``bony`` parser (also used by the docs and tests)."""
    parser = _Parser(
        prog="bony",
        description="Bony: self-supervised foundation models for prostate histopathology. "
        "Each COMMAND is a pipeline stage; 'bony COMMAND --help' lists all its options.",
    )
    parser.add_argument("--version", action="version", version=f"bony {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in _commands():
        p = sub.add_parser(command.name, help=command.summary, description=command.summary,
                           epilog=help_text(command.schema), formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(p)
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied after --config")
        p.add_argument("--config", type=Path, help="YAML config file (see configs/)")
        p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
        p.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bony``; returns the exit status."""
    parser = build_parser()
    # overrides may come after options (`--config f.yaml a=1`), which argparse's positional
    # matching does not allow: collect the leftover key=value words here
    args, extra = parser.parse_known_args(argv)
    unknown = [word for word in extra if word.startswith("-") or "=" not in word]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "inputs", None):
        # `bony tile a.svs b.svs level=1`: the key=value words are overrides, not slides
        is_override = [_OVERRIDE.match(str(p)) is not None and not p.exists() for p in args.inputs]
        args.overrides = [*args.overrides, *(str(p) for p, o in zip(args.inputs, is_override) if o)]
        args.inputs = [p for p, o in zip(args.inputs, is_override) if not o]
        if not args.inputs:
            parser.error("no INPUT given")
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    command: Command = args._command
    try:
        cfg = load_config(command.schema, args.config, args.overrides)
        return command.run(args, cfg)
    except BonyError as exc:
        print(f"bony {command.name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"bony {command.name}: interrupted", file=sys.stderr)
        return 130
