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
    report = repo.parent / "shared" / "report" / "000_279bfb63f361bb68.txt"
    if not report.is_file():
        pytest.skip(f"{report}: the seed's report is not here")
    text = " ".join(report.read_text().split())
    for key, (_, quote) in FROM_THE_REPORT.items():
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


WAVELET_QUOTE = ("nous avons pu mener de petites expériences en utilisant les ondelettes de Haar en considérant une seule "
                 "échelle de décomposition et en considérant l'\"Approximation\" de l'image")
"""§9.2.4: the report's wavelet experiment, one level of the Haar transform and its approximation band."""


def test_the_seeds_wavelet_run_is_the_reports_approximation_band(repo: Path) -> None:
    """The seed's wavelet row trains seed.yaml behind the one-level approximation band (model.stem=haar_approx), the
    report's variant; haar_bands (every band) is Bony's, a second arm of the same sweep."""
    assert "une seule échelle" in WAVELET_QUOTE and "Approximation" in WAVELET_QUOTE
    sweep = read_sweep(repo / "configs" / "pretrain" / "sweeps" / "wavelet.yaml")
    assert list(sweep.arms) == ["haar_approx", "haar_bands"] and sweep.base.resolve().name == "seed.yaml"
    report_arm = flat_keys(to_dict(arm_config(sweep, "haar_approx")))
    seed = flat_keys(to_dict(load_config(PretrainConfig, repo / "configs" / "pretrain" / "seed.yaml")))
    assert {key for key in seed if seed[key] != report_arm[key]} == {"model.stem"}
    assert report_arm["model.stem"] == "haar_approx"
    rows = {row["name"]: row for row in yaml.safe_load((repo / "configs" / "evaluate" / "seed.yaml").read_text())["encoders"]}
    assert rows["dino-haar"]["specs"] == ["bony:runs/seed/wavelet/haar_approx"]
    assert "haar_approx" in rows["dino-haar"]["label"] and "report" in rows["dino-haar"]["label"]
    demo = load_config(PretrainConfig, repo / "configs" / "pretrain" / "demo_wavelet.yaml")
    assert demo.model.stem == "haar_approx", "the wavelet chapter compares the report's variant"


def test_the_wavelet_quote_is_in_the_report(repo: Path) -> None:
    report = repo.parent / "shared" / "report" / "000_279bfb63f361bb68.txt"
    if not report.is_file():
        pytest.skip(f"{report}: the seed's report is not here")
    assert " ".join(WAVELET_QUOTE.split()) in " ".join(report.read_text().split())
