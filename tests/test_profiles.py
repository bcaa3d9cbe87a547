"""The ``seed`` profile reproduces the report's experiment: every value it sets is quoted from the report or is
facebookresearch/dino's ``main_dino.py`` default, and this table says which.

The report's quotes are checked against its text in ``../shared/report`` when it is there (skipped otherwise); DINO's
defaults are written here from ``main_dino.py``'s argument parser and its ``DINOHead``/``DINOLoss`` signatures.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bonylib.compose.pretrain import PretrainConfig
from bonylib.compose.sweeps import arm_config, read_sweep
from bonylib.config import flat_keys, load_config, to_dict

DINO_DEFAULTS: dict[str, Any] = {
    "seed": 0, "model.hidden_dim": 2048, "model.bottleneck_dim": 256, "model.norm_last_layer": True,
    "model.drop_path": 0.1, "crops.pipeline": "dino", "crops.global_scale": [0.4, 1.0],
    "crops.local_scale": [0.05, 0.4], "optim.epochs": 100, "optim.lr": 0.0005, "optim.min_lr": 1e-6,
    "optim.warmup_epochs": 10, "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4,
    "optim.momentum_teacher": 0.996, "optim.clip_grad": 3.0, "optim.freeze_last_layer": 1, "optim.precision": "fp16",
    "loss.warmup_teacher_temp": 0.04, "loss.teacher_temp": 0.04, "loss.warmup_teacher_temp_epochs": 0,
    "loss.student_temp": 0.1, "loss.center_momentum": 0.9,
}
"""main_dino.py (facebookresearch/dino): --seed 0, DINOHead(hidden_dim=2048, bottleneck_dim=256), --norm_last_layer
True, --drop_path_rate 0.1, DataAugmentationDINO, --global_crops_scale 0.4 1., --local_crops_scale 0.05 0.4, --epochs
100, --lr 0.0005, --min_lr 1e-6, --warmup_epochs 10, --weight_decay 0.04, --weight_decay_end 0.4, --momentum_teacher
0.996, --clip_grad 3.0, --freeze_last_layer 1, --use_fp16 True, --warmup_teacher_temp 0.04, --teacher_temp 0.04,
--warmup_teacher_temp_epochs 0, DINOLoss(student_temp=0.1, center_momentum=0.9)."""

FROM_THE_REPORT: dict[str, tuple[Any, str]] = {
    "model.backbone": ("xcit_medium_24_p16_224", "Notre partenaire nous a indiqué vouloir un XCiT \"medium\""),
    "model.out_dim": (4096, "il est apparu que la valeur optimale était 4096"),
    "crops.global_crops": (1, "Nous avons donc choisi de sélectionner 1 vue globale pour le teacher et 5 vues locales"),
    "crops.local_crops": (5, "1 vue globale pour le teacher et 5 vues locales"),
    "crops.global_size": (224, "2 vues globales en  $224 \\times 224$"),
    "crops.local_size": (96, "8 vues locales en  $96 \\times 96$"),
    "optim.batch_size": (100, "Nous avons donc choisi un batchsize de 100"),
    "data.tile_px": (224, "Au final, on obtient un nombre de tiles (images croppées en  $224 \\times 224$ ) de 2852703"),
}
"""Keys set from the report's sentences (chapter 6)."""

BY_CONSTRUCTION: dict[str, tuple[Any, str]] = {
    "model.stem": ("none", "the report trains XCiT-M on the images; its Haar stem is a later idea (§9.2)"),
    "optim.accumulate": (1, "100 images per GPU per step, as the report's batch; 25 x 4 where memory is short"),
}
"""Keys the report implies without a number of their own: no stem, no accumulation at 100 per GPU."""

RUN_KEYS = {"data.manifest", "data.workers", "data.images", "checkpoint_every"}
"""Where the data are and how the job runs: not hyper-parameters of the experiment."""


@pytest.fixture(scope="module")
def seed_profile(repo: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the keys seed.yaml sets, flattened; the config it loads into)."""
    path = repo / "configs" / "pretrain" / "seed.yaml"
    written = flat_keys(yaml.safe_load(path.read_text()))
    return written, flat_keys(to_dict(load_config(PretrainConfig, path)))


def test_every_value_of_the_seed_profile_is_the_reports_or_dinos_default(seed_profile) -> None:
    written, loaded = seed_profile
    table = {**{k: (v, "DINO default") for k, v in DINO_DEFAULTS.items()}, **FROM_THE_REPORT, **BY_CONSTRUCTION}
    assert len(table) >= 25 + 4  # the 25 hyper-parameters of pretraining at least, and the crop geometry
    unsourced = sorted(set(written) - set(table) - RUN_KEYS)
    assert not unsourced, f"seed.yaml sets keys with no source in this table: {unsourced}"
    wrong = {key: (loaded[key], value) for key, (value, _) in table.items() if loaded[key] != value}
    assert not wrong, wrong
    assert sorted(set(table) - set(written)) == [], "every sourced key is written out in seed.yaml, not left to Bony's defaults"


def test_the_reports_quotes_are_in_the_report(repo: Path) -> None:
    """The pretraining profile's quotes and the evaluation profile's (EVAL_FROM_THE_REPORT, below) are the report's."""
    report = repo.parent / "shared" / "report" / "000_279bfb63f361bb68.txt"
    if not report.is_file():
        pytest.skip(f"{report}: the seed's report is not here")
    text = " ".join(report.read_text().split())
    for key, (_, quote) in {**FROM_THE_REPORT, **{f"evaluate {k}": v for k, v in EVAL_FROM_THE_REPORT.items()}}.items():
        assert " ".join(quote.split()) in text, key


def test_the_step_and_its_learning_rate_read_as_dino_scales_them(seed_profile) -> None:
    """100 per GPU on 24 GPUs is 2,400 images per step and a peak rate of 0.0005 x 2400 / 256 (DINO's scaling)."""
    _, loaded = seed_profile
    images = loaded["optim.batch_size"] * loaded["optim.accumulate"] * 24
    assert images == 2400 and loaded["optim.lr"] * images / 256 == pytest.approx(0.0046875)


def test_the_recommended_profile_says_why_it_departs_from_the_seeds(repo: Path) -> None:
    """cluster.yaml keeps the seed's scale and states a reason for each key it sets otherwise."""
    seed = flat_keys(to_dict(load_config(PretrainConfig, repo / "configs" / "pretrain" / "seed.yaml")))
    text = (repo / "configs" / "pretrain" / "cluster.yaml").read_text()
    ours = flat_keys(to_dict(load_config(PretrainConfig, repo / "configs" / "pretrain" / "cluster.yaml")))
    departures = {key for key in seed if seed[key] != ours[key] and key not in RUN_KEYS}
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    named = {"crops.pipeline": "pipeline", "loss.teacher_temp": "0.07", "loss.warmup_teacher_temp_epochs": "30 epochs",
             "optim.batch_size": "25 images per GPU", "optim.precision": "precision auto"}
    assert departures <= set(named), departures - set(named)
    for key in departures:
        assert re.search(re.escape(named[key]), header), key
    assert ours["model.backbone"] == seed["model.backbone"] and ours["model.out_dim"] == seed["model.out_dim"]


# ---- the evaluation profile: configs/evaluate/seed.yaml --------------------------------------------------------------

EVAL_FROM_THE_REPORT: dict[str, tuple[Any, str]] = {
    "benchmarks": (["panda", "deepgleason", "sicapv2"], "Model PANDA test subset (Accuracy)"),
    "panda.classes": (["background", "benign", "G3", "G4", "G5"],
                      "0: background de l'image, 1: Tissu sain, 2: Gleason 3, 3: Gleason 4, 4: Gleason 5"),
    "panda.heads": (["mlp"], "Ce décodeur est un MLP"),
    "panda.fractions": ([0.8, 0.1, 0.1], "le trainval-test split a été fait en (0.8 0.1 0.1)"),
    "panda.scored_parts": (["test", "val"], "une performance sur le test de 0.81"),
    "panda.probe.mlp_hidden": ([7192, 2048, 512, 128], "hidden dims=[7192, 2048, 512, 128]"),
    "panda.probe.patience": (0, "il a été choisi de définir un nombre d'epochs fixe"),
    "deepgleason.heads": (["mask"], "comparée au mask obtenu précédemment par une MSE"),
    "deepgleason.mask_scale": ("codes", "quand on sait que les images sont normalisées entre 0 et 1"),
    "deepgleason.fractions": ([0.8, 0.1, 0.1], "le train-val-test split a été fait en (0.8 0.1 0.1)"),
    "deepgleason.scored_parts": (["val", "test"], "Fonction de coût de validation (segmentation)"),
    "deepgleason.decoder.out_size": (224, "jusqu'à avoir une image en 224x224"),
    "deepgleason.decoder.width": (256, "self.fc = nn.Linear(num_features, 256 * 7 * 7)"),
    "sicapv2.heads": (["reconstruction"], "la même image d'entrée mais \"blurrée\""),
    "sicapv2.reconstruction_fractions": ([0.8, 0.1, 0.1], "le train-val-test split a été fait en $(0.8 \\quad 0.1"),
    "sicapv2.scored_parts": (["val", "test"], "On résume les performances sur la validation"),
    "sicapv2.decoder.out_size": (224, "jusqu'à avoir une image en 224x224 qui sera ensuite comparée"),
}
"""Evaluation keys set from the report's sentences (chapters 7 and 8)."""

EVAL_DINO_DEFAULTS: dict[str, Any] = {
    "panda.probe.epochs": 100, "panda.probe.optimizer": "sgd", "panda.probe.batch_size": 128,
    "panda.probe.lr": 0.0005,
}
"""facebookresearch/dino's eval_linear.py, the head DINO trains on frozen features: --epochs 100, SGD with momentum 0.9
and no weight decay, --batch_size_per_gpu 128, --lr 0.001 for 256 images (x 128 / 256 on one GPU)."""

EVAL_BONYS: dict[str, tuple[Any, str]] = {
    "panda.providers": (["radboud"], "Karolinska's masks grade no pattern"),
    "deepgleason.split": ("slides", "Bony splits whole slides"),
    "deepgleason.decoder.patience": (0, "the report trains for a fixed length"),
    "sicapv2.decoder.patience": (0, "as DeepGleason's"),
    "sicapv2.decoder.width": (256, "the DeepGleason decoder's"),
    "sicapv2.blur_sigma": (2.0, "the report does not state its σ"),
    "panda.probe.eval_every": (1000, "with patience 0 it picks nothing"),
    **{f"{bench}.decoder.{key}": (value, "not stated") for bench in ("deepgleason", "sicapv2")
       for key, value in (("max_epochs", 50), ("lr", 0.001), ("batch_size", 64))},
}
"""Keys neither the report nor DINO sets, or readings of the report: each is Bony's and its comment says so."""

EVAL_RUN_KEYS = {"bootstrap", "embed.batch_size", "embed.device", "embed.precision", "embed.workers",
                 *(f"{bench}.{key}" for bench in ("panda", "deepgleason", "sicapv2") for key in ("manifest", "data", "runs"))}
"""Where the data are, how the job runs and how many seeds repeat it: not the protocol."""


def key_comments(text: str) -> dict[str, str]:
    """The comment on each YAML line, by the line's dotted key (nesting read from the indentation)."""
    path: list[tuple[int, str]] = []
    comments = {}
    for line in text.splitlines():
        match = re.match(r"^( *)([A-Za-z_][\w]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match[1]), match[2], match[3]
        path = [(i, k) for i, k in path if i < indent] + [(indent, key)]
        comments[".".join(k for _, k in path)] = rest.partition("#")[2]
    return comments


def test_every_value_of_the_seed_evaluation_is_the_reports_dinos_or_said_to_be_bonys(repo: Path) -> None:
    from bonylib.evaluation.evaluate import EvaluateConfig

    path = repo / "configs" / "evaluate" / "seed.yaml"
    raw = yaml.safe_load(path.read_text())
    written = flat_keys({k: v for k, v in raw.items() if k != "encoders"})
    loaded = flat_keys(to_dict(load_config(EvaluateConfig, path)))
    table = {**EVAL_FROM_THE_REPORT, **{k: (v, "DINO default") for k, v in EVAL_DINO_DEFAULTS.items()}, **EVAL_BONYS}
    assert len(EVAL_FROM_THE_REPORT) + len(EVAL_DINO_DEFAULTS) >= 20
    unsourced = sorted(set(written) - set(table) - EVAL_RUN_KEYS)
    assert not unsourced, f"evaluate/seed.yaml sets keys with no source in this table: {unsourced}"
    wrong = {key: (loaded[key], value) for key, (value, _) in table.items() if loaded[key] != value}
    assert not wrong, wrong
    assert sorted(set(table) - set(written)) == [], "every sourced key is written out in seed.yaml"
    comments = key_comments(path.read_text())
    unmarked = [key for key in EVAL_BONYS if not re.search(r"Bony's|as DeepGleason's|the DeepGleason decoder's|the "
                                                           r"report trains", comments.get(key, ""))]
    assert not unmarked, f"readings of Bony's without a comment saying so: {unmarked}"
    assert [entry["name"] for entry in raw["encoders"]][0] == "dino-head", "the report's heads read the 4096-d output"


WAVELET_QUOTE = ("nous avons pu mener de petites expériences en utilisant les ondelettes de Haar en considérant une seule "
                 "échelle de décomposition et en considérant l'\"Approximation\" de l'image")
"""§9.2.4: the report's wavelet experiment, one level of the Haar transform and its approximation band."""


def test_the_seeds_wavelet_run_is_the_reports_approximation_band(repo: Path) -> None:
    """The wavelet run at the seed's scale is seed.yaml behind the one-level approximation band (model.stem=haar_approx),
    the report's variant; haar_bands (every band) is Bony's, a second arm of the same sweep. The report benchmarked
    neither (its §8 has no wavelet row), so they are rows of Bony's evaluation (evaluate/cluster.yaml), not of the
    report's protocol (evaluate/seed.yaml)."""
    assert "une seule échelle" in WAVELET_QUOTE and "Approximation" in WAVELET_QUOTE
    sweep = read_sweep(repo / "configs" / "pretrain" / "sweeps" / "wavelet.yaml")
    assert list(sweep.arms) == ["haar_approx", "haar_bands"] and sweep.base.resolve().name == "seed.yaml"
    report_arm = flat_keys(to_dict(arm_config(sweep, "haar_approx")))
    seed = flat_keys(to_dict(load_config(PretrainConfig, repo / "configs" / "pretrain" / "seed.yaml")))
    assert {key for key in seed if seed[key] != report_arm[key]} == {"model.stem"}
    assert report_arm["model.stem"] == "haar_approx"
    rows = {row["name"]: row for row in yaml.safe_load((repo / "configs" / "evaluate" / "cluster.yaml").read_text())["encoders"]}
    assert rows["dino-haar"]["specs"] == ["bony:runs/seed/wavelet/haar_approx"]
    assert "haar_approx" in rows["dino-haar"]["label"] and "report" in rows["dino-haar"]["label"]
    assert rows["dino-haar-bands"]["specs"] == ["bony:runs/seed/wavelet/haar_bands"]
    demo = load_config(PretrainConfig, repo / "configs" / "pretrain" / "demo_wavelet.yaml")
    assert demo.model.stem == "haar_approx", "the wavelet chapter compares the report's variant"


def test_the_wavelet_quote_is_in_the_report(repo: Path) -> None:
    report = repo.parent / "shared" / "report" / "000_279bfb63f361bb68.txt"
    if not report.is_file():
        pytest.skip(f"{report}: the seed's report is not here")
    assert " ".join(WAVELET_QUOTE.split()) in " ".join(report.read_text().split())
