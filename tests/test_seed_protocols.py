"""The report's benchmark protocols as options (issue 18): its decoder exactly as printed, its mask scale, its MLP
trained for a fixed length, DINO's SGD, the 5-class PANDA task without Karolinska's slides, and validation scores beside
test scores from one fit. Each is checked against an independent statement of what the report or DINO does."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation.benchmarks import heads as heads_module
from bonylib.evaluation.benchmarks.deepgleason import DeepGleasonMasks
from bonylib.evaluation.benchmarks.panda import PandaTiles, benchmarked, read_slide_table
from bonylib.evaluation.benchmarks.sicapv2 import Sicapv2
from bonylib.evaluation.decoders import Decoder
from bonylib.evaluation.probes import fit_classifier, fit_head
from bonylib.evaluation.features import Features
from bonylib.evaluation.sensitivity import mean_image_mse
from tests.test_benchmarks import CPU, bench_data, dg_config, panda_config, separable, sicap_config

pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning",
                                        "ignore:A single label was found:UserWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, smoke_data: Path, repo: Path) -> dict[str, Path]:
    return bench_data(tmp_path_factory.getbasetemp() / "bench-data", smoke_data, repo)


def printed_upsample(in_dim: int) -> tuple[nn.Linear, nn.Sequential]:
    """The report's XCiTWithDecoder_4096 (§7.2, figure 21) after its frozen encoder, typed out from the page."""
    fc = nn.Linear(in_dim, 256 * 7 * 7)
    upsample = nn.Sequential(
        nn.ConvTranspose2d(256, 128, kernel_size=3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.ConvTranspose2d(128, 64, kernel_size=3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.ConvTranspose2d(64, 32, kernel_size=3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, kernel_size=3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.ConvTranspose2d(16, 1, kernel_size=3, stride=2, padding=1, output_padding=1), nn.Sigmoid())
    return fc, upsample


def test_the_decoder_is_the_reports_as_printed() -> None:
    ours = Decoder(64).eval()
    fc, upsample = printed_upsample(64)
    theirs = [fc, *upsample]
    assert len(list(ours.parameters())) == sum(len(list(m.parameters())) for m in theirs)
    with torch.no_grad():  # ours' weights, in order, into the printed layers: equal outputs mean equal networks
        for mine, printed in zip([p for p in ours.parameters()], [p for m in theirs for p in m.parameters()]):
            assert mine.shape == printed.shape
            printed.copy_(mine)
        for mine, printed in zip(ours.buffers(), [b for m in theirs for b in m.buffers()]):
            printed.copy_(mine)
    upsample.eval()
    x = torch.randn(3, 64)
    expected = upsample(fc(x).view(3, 256, 7, 7))
    assert expected.shape == (3, 1, 224, 224)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-6)


def test_patience_zero_trains_the_whole_length_and_keeps_the_last_weights() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    looks: list[float] = []

    def validate(model: nn.Module) -> float:
        looks.append(float(model.weight.detach().sum()))
        return -len(looks)  # always worse: early stopping would stop at the second look and keep the first

    head = nn.Linear(4, 2)
    fit = fit_head(head, nn.functional.cross_entropy, lambda index: ((x[index],), y[index]), 64, validate, "score",
                   maximize=True, lr=0.1, batch_size=16, max_steps=40, eval_every=10, patience=0, seed=0)
    assert [point["step"] for point in fit.curve] == [10, 20, 30, 40]
    assert fit.best_step == 40 and float(fit.head.weight.detach().sum()) == pytest.approx(looks[-1])
    stopped = fit_head(nn.Linear(4, 2), nn.functional.cross_entropy, lambda index: ((x[index],), y[index]), 64,
                       validate, "score", maximize=True, lr=0.1, batch_size=16, max_steps=40, eval_every=10,
                       patience=1, seed=0)
    assert stopped.best_step == 10 and stopped.curve[-1]["step"] == 20


def test_sgd_is_dinos_linear_evaluation_step() -> None:
    """One step of fit_head's sgd equals w - lr * grad (momentum 0.9 has nothing to carry on the first step, no weight
    decay), computed here by hand from the same initialisation and batch."""
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    head = nn.Linear(5, 3)
    torch.manual_seed(7)
    fresh = nn.Linear(5, 3)  # fit_head re-initialises from its seed: the same draw as this one
    with torch.random.fork_rng():
        torch.manual_seed(7)
        fresh.reset_parameters()
    order = torch.randperm(8, generator=torch.Generator().manual_seed(7))
    loss = nn.functional.cross_entropy(fresh(x[order]), y[order])
    grad_w, grad_b = torch.autograd.grad(loss, [fresh.weight, fresh.bias])
    lr = 0.5
    fit = fit_head(head, nn.functional.cross_entropy, lambda index: ((x[index],), y[index]), 8, lambda m: 0.0, "s",
                   maximize=True, lr=lr, batch_size=8, max_steps=1, eval_every=1, patience=0, seed=7, optimizer="sgd")
    torch.testing.assert_close(fit.head.weight, fresh.weight - lr * grad_w)
    torch.testing.assert_close(fit.head.bias, fresh.bias - lr * grad_b)
    with pytest.raises(ValueError, match="optimizer"):
        fit_classifier(nn.Linear(5, 3), (x, y), (x, y), max_steps=1, optimizer="lbfgs")


def test_epochs_set_the_length_in_passes_over_the_training_rows(data: dict[str, Path], tmp_path: Path) -> None:
    bench = PandaTiles(panda_config(data, heads="[linear]", **{"probe.epochs": 3, "probe.patience": 0,
                                                                "probe.batch_size": 7}), tmp_path)
    result = bench.fit("linear", "test", 0, Features(separable(bench.targets, len(bench.classes("linear")))), CPU)
    train = int((bench.parts == "train").sum())
    assert result.info["curve"][-1]["step"] == result.info["best_step"] == 3 * math.ceil(train / 7)
    with pytest.raises(ConfigError, match="epochs and patience"):
        panda_config(data, **{"probe.epochs": -1})


def test_val_and_test_come_from_one_fit_and_score_their_own_rows(data: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fits: list[int] = []
    real = heads_module.fit_classifier

    def counting(*args, **kwargs):
        fits.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(heads_module, "fit_classifier", counting)
    bench = PandaTiles(panda_config(data, heads="[mlp]", scored_parts="[val,test]"), tmp_path)
    assert bench.heads["mlp"].runs == (("val", 0), ("test", 0))
    assert [c.name for c in bench.columns][:4] == ["PANDA tiles mlp accuracy (val)", "PANDA tiles mlp bal. acc. (val)",
                                                   "PANDA tiles mlp macro-F1 (val)", "PANDA tiles mlp accuracy (test)"]
    raw = separable(bench.targets, len(bench.classes("mlp")))
    features = Features(raw)
    val, test = (bench.fit("mlp", part, 0, features, CPU) for part in ("val", "test"))
    assert fits == [0], "one fit served both parts"
    for result, part in ((val, "val"), (test, "test")):
        rows = bench.parts == part
        assert list(result.arrays["rows"]) == list(bench.ids[rows])
        assert list(result.arrays["y_true"]) == list(bench.targets[rows])
    bench.fit("mlp", "val", 0, Features(raw.copy()), CPU)
    assert fits == [0, 0], "other features (another encoder) are fitted again"
    with pytest.raises(ConfigError, match="scored_parts"):
        panda_config(data, scored_parts="[train]")


def test_five_classes_without_karolinska_are_the_reports_panda_task(data: dict[str, Path], tmp_path: Path) -> None:
    every = pd.read_parquet(data["panda"])
    slides = read_slide_table(data["panda-data"])
    assert set(slides["data_provider"]) == {"radboud", "karolinska"}, "the smoke PANDA has both providers"
    five = ["background", "benign", "G3", "G4", "G5"]
    keep = benchmarked(every, five, ["radboud"], slides["data_provider"])
    radboud = every["slide_id"].isin(slides.index[slides["data_provider"] == "radboud"])
    assert np.array_equal(keep, (radboud & every["label_name"].isin(five)).to_numpy())
    assert keep.any() and not keep.all()
    assert np.array_equal(benchmarked(every, five, [], slides["data_provider"]), every["label_name"].isin(five))
    with pytest.raises(BonyError, match="no slide of data_provider 'oslo'"):
        PandaTiles(panda_config(data, providers="[oslo]"), tmp_path)


def test_the_seeds_mask_scale_is_the_mask_file_read_as_an_8_bit_image(data: dict[str, Path], tmp_path: Path) -> None:
    bench = DeepGleasonMasks(dg_config(data, heads="[mask]", mask_scale="codes", **{"decoder.out_size": 56,
                                                                                     "decoder.max_epochs": 2}), tmp_path)
    features = np.random.default_rng(0).normal(size=(len(bench.frame), 8)).astype(np.float32)
    result = bench.fit("mask", "test", 0, Features(features), CPU)
    table = pd.read_csv(data["deepgleason-data"] / "tiles.csv").set_index("tile_id")
    frame = bench.frame.set_index(bench.ids)
    for row, target in zip(result.arrays["example_rows"], result.arrays["example_true"]):
        tile = frame.loc[row]
        mask = Image.open(data["deepgleason-data"] / table.loc[tile["slide_id"], "mask"])
        x, y, size = int(tile["x"]), int(tile["y"]), int(tile["size"])
        crop = mask.crop((x, y, x + size, y + size)).resize((56, 56), Image.Resampling.NEAREST)
        codes = np.asarray(crop, np.float32)
        codes = codes[..., 0] if codes.ndim == 3 else codes  # DeepGleason's codes are in the red channel
        assert np.allclose(target[0], codes / 255)  # torchvision's ToTensor on the PNG
    assert result.arrays["example_true"].max() <= 5 / 255
    with pytest.raises(ConfigError, match="mask_scale"):
        dg_config(data, mask_scale="percent")


def test_the_seeds_reconstruction_split_is_by_patient_at_its_shares(data: dict[str, Path], tmp_path: Path) -> None:
    bench = Sicapv2(sicap_config(data, heads="[reconstruction]", reconstruction_fractions="[0.5,0.25,0.25]",
                                 scored_parts="[val,test]"), tmp_path)
    parts = bench.reconstruction_parts
    patients = bench.frame["group"].to_numpy()
    assert (pd.Series(parts).groupby(patients).nunique() == 1).all() and set(parts) == {"train", "val", "test"}
    assert bench.heads["reconstruction"].runs == (("val", 0), ("test", 0))
    features = bench.blurred.flatten(1).numpy()
    val = bench.fit("reconstruction", "val", 0, Features(features), CPU)
    assert list(val.arrays["rows"]) == list(bench.ids[parts == "val"])
    official = Sicapv2(sicap_config(data, heads="[reconstruction]"), tmp_path)
    assert np.array_equal(official.reconstruction_parts, official.patch_parts["Test"][official.tile_patch])


def test_the_mean_image_floor_and_the_blur_it_moves_with(data: dict[str, Path], tmp_path: Path) -> None:
    """The floor of the blur sensitivity is the MSE of the mean training tile, by hand; it falls as σ widens (less
    left to rebuild), and features that hold the blurred tile beat it."""
    floors = []
    for sigma in (0.5, 2.0):
        bench = Sicapv2(sicap_config(data, heads="[reconstruction]", blur_sigma=sigma), tmp_path)
        parts, targets = bench.reconstruction_parts, bench.blurred.numpy().astype(np.float64)
        by_hand = ((targets[parts == "test"] - targets[parts == "train"].mean(0)) ** 2).mean()
        floors.append(mean_image_mse(bench.blurred, parts, "test"))
        assert floors[-1] == pytest.approx(by_hand)
    assert floors[1] < floors[0]
    result = bench.fit("reconstruction", "test", 0, Features(bench.blurred.flatten(1).numpy()), CPU)
    assert result.metrics["mse"] < floors[1]
