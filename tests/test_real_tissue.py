"""The real-tissue chapter's steps on the real samples, at toy cost: both sets tiled at one µm/px, a two-step DINO run
on them, a k-NN-only evaluation with an untrained encoder, the example tiles and the patch-token colours (checked
against scikit-learn's PCA). Skipped without ../shared/data, except what needs no data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA

from bonylib.attention.tokens import token_colours
from bonylib.compose import real_tissue
from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config
from bonylib.models.registry import load_encoder

ARCH = "xcit_nano_12_p16_224"
pytestmark = pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning",
                                        "ignore:A single label was found:UserWarning")


def test_a_missing_set_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "sicapv2_subset").mkdir()
    reason = real_tissue.find_real_sets(tmp_path, 0.23)
    assert isinstance(reason, str) and "arvaniti_tma not found" in reason and "\n" not in reason
    assert isinstance(real_tissue.find_real_sets(None, 0.23), str)


def test_token_colours_are_the_first_components_of_all_the_tiles_tokens(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"t{k}.png")
    spec = f"random:{ARCH}:0"
    colours = token_colours(spec, tmp_path, 48)
    assert colours.colours.shape == (3, 3, 3, 3) and colours.names == ["t0", "t1", "t2"]
    encoder = dataclasses.replace(load_encoder(spec), input_size=48)
    images = [Image.open(tmp_path / f"t{k}.png").convert("RGB").resize((48, 48), Image.Resampling.BILINEAR)
              for k in range(3)]
    batch = torch.stack([encoder.transform(image) for image in images])
    tokens = encoder.embed(batch, "patch").numpy().reshape(-1, encoder.embed_dim)
    reference = PCA(3).fit_transform(tokens)
    ours = colours.colours.reshape(-1, 3)
    for c in range(3):
        assert abs(np.corrcoef(ours[:, c], reference[:, c])[0, 1]) > 0.999, c
        assert ours[:, c].min() == pytest.approx(0) and ours[:, c].max() == pytest.approx(1)


@pytest.mark.slow
def test_the_chapter_steps_run_on_the_real_sets(shared_data: Path, tmp_path: Path, repo: Path) -> None:
    sets = real_tissue.find_real_sets(shared_data, 0.23)
    assert not isinstance(sets, str)
    run = tmp_path / "run"
    tiles = real_tissue.tile_real_sets(sets, run / "real" / "tiles", ["mpp=1.0", "tile_px=172"])
    table = real_tissue.magnification(tiles, sets)
    assert table.loc["SICAPv2", "declared µm/px"] == 1.0 and table.loc["Arvaniti TMA", "declared µm/px"] == 0.23
    assert np.allclose(table["tile µm/px"], 1.0, atol=0.01), "both sets at one scale"
    assert table.loc["Arvaniti TMA", "region read (px)"] == round(172 / 0.23) and table.loc["Arvaniti TMA", "tiles"] == 200
    both = pd.read_parquet(tiles.pretrain)
    assert len(both) == table["tiles"].sum() and set(both["dataset"]) == {"sicapv2", "imagefolder"}

    cfg = load_config(PretrainConfig, repo / "configs" / "pretrain" / "real.yaml",
                      [f"data.manifest={tiles.pretrain}", "max_steps=2", "optim.batch_size=4", "data.workers=0",
                       "optim.precision=fp32"])
    trained = build_trainer(cfg, run / "real" / "pretrain").train()
    assert (trained / "teacher_backbone.safetensors").is_file()

    out = real_tissue.evaluate_real(repo / "configs" / "evaluate" / "real.yaml", run, sets, [
        f"encoders=[{{name: random, specs: ['random:{ARCH}:0'], input_size: 32}}]", "bootstrap=0",
        "images.heads=[knn]", "sicapv2.heads=[patches_knn,slides]", "embed.workers=0", "embed.device=cpu"])
    long = pd.read_csv(out / "results_long.csv")
    assert set(long["benchmark"]) == {"images", "sicapv2"} and long["mean"].notna().all()
    scores = real_tissue.slide_scores(out, sets)
    wsi = pd.read_excel(sets.sicapv2 / "wsi_labels.xlsx").set_index("slide_id")
    assert sorted(scores.index) == sorted(wsi.index[wsi.index.isin(both["parent_slide"])])
    for slide, truth in scores["Gleason (wsi_labels)"].items():
        primary, secondary = wsi.loc[slide, ["Gleason_primary", "Gleason_secondary"]]
        assert truth == ("benign" if primary == 0 else f"{primary}+{secondary}")

    examples = real_tissue.example_tiles(tiles, run / "examples")
    names = sorted(p.stem for p in examples.iterdir())
    assert names == ["0-sicap-G3", "1-sicap-G4", "2-sicap-benign", "3-tma-benign", "4-tma-gleason3", "5-tma-gleason4",
                     "6-tma-gleason5"]
    assert all(Image.open(p).size == (172, 172) for p in examples.iterdir())
