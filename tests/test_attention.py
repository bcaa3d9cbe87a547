"""Attention maps (ViT CLS attention, XCiT's three views), slide heatmaps and ``bony attention``.

Each map is checked on constructed inputs, where the attention must peak on a known patch, and against a
direct computation from the block's own weights; the models are tiny timm ViTs and XCiTs built here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.decomposition import PCA
from timm.models.vision_transformer import VisionTransformer
from timm.models.xcit import Xcit
from torch import nn

from bonylib.attention.command import AttentionConfig
from bonylib.attention.maps import capture_attention, top_mass_mask
from bonylib.cli import build_parser, main
from bonylib.config import describe
from bonylib.data import heatmaps
from bonylib.data.heatmaps import Heatmap, pca_colours, read_thumbnail
from bonylib.data.slides import open_slide
from bonylib.errors import ConfigError
from bonylib.models.backbones import create_backbone
from bonylib.models.export import export_encoder
from bonylib.models.head import DINOHead

DIM, HEADS = 32, 2
HEAD_DIM = DIM // HEADS


def tiny_vit() -> VisionTransformer:
    """vit_small_patch14_reg4_dinov2 in miniature: 4 register tokens, no position embedding on prefix tokens,
    layer scale, patch 14; depth 2 and width 32."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=56, patch_size=14, embed_dim=DIM, depth=2, num_heads=HEADS, num_classes=0,
                             reg_tokens=4, no_embed_class=True, init_values=1e-5, dynamic_img_size=True).eval()


def tiny_xcit(use_pos_embed: bool = True) -> Xcit:
    torch.manual_seed(0)
    return Xcit(img_size=32, patch_size=8, embed_dim=DIM, depth=2, num_heads=HEADS, num_classes=0, cls_attn_layers=2,
                use_pos_embed=use_pos_embed).eval()


def block_inputs(blocks: nn.ModuleList, key: str, store: dict) -> list:
    """Pre-hooks (the test's own) that keep each block's input tokens."""
    return [block.register_forward_pre_hook(lambda _m, args, i=i: store.__setitem__((key, i), args[0]))
            for i, block in enumerate(blocks)]


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---- ViT ---------------------------------------------------------------------------------------


def test_vit_cls_attention_peaks_on_the_bright_patch_with_registers_left_out() -> None:
    vit = tiny_vit()
    e0 = F.one_hot(torch.tensor(0), DIM).float()
    with torch.no_grad():
        vit.patch_embed.proj.weight.zero_()
        vit.patch_embed.proj.bias.zero_()
        vit.patch_embed.proj.weight[0] = 1.0 / (3 * 14 * 14)  # token channel 0 = the patch's mean intensity
        vit.pos_embed.zero_()
        vit.cls_token.copy_(e0)
        vit.reg_token.copy_(e0.expand(1, 4, DIM))  # registers look like the bright patch: they draw attention too
        qkv = vit.blocks[0].attn.qkv
        qkv.weight.zero_()
        qkv.bias.zero_()
        qkv.weight[: 2 * DIM] = 10 * torch.eye(DIM).repeat(2, 1)  # q = k = 10 x token
    image = torch.zeros(1, 3, 56, 56)
    image[..., 28:42, 14:28] = 1.0  # patch (row 2, column 1) of the 4 x 4 grid
    with torch.no_grad(), capture_attention(vit) as capture:
        vit(image)
        maps = capture.maps()
    assert maps.architecture == "vit" and maps.cls.shape == (1, 2, HEADS, 4, 4)
    first = maps.cls[0, 0]
    for head in range(HEADS):
        assert np.unravel_index(first[head].argmax(), (4, 4)) == (2, 1)
        assert first[head, 2, 1] > 0.99
    np.testing.assert_allclose(maps.cls.sum(axis=(-1, -2)), 1.0, rtol=1e-5)
    assert maps.cls_patch_mass[0, 0, 0] < 0.25  # head 0 gave most of its attention to the 4 registers and itself
    assert maps.token_norms is None and maps.channel_attention is None


def test_vit_outputs_unchanged_by_extraction_and_maps_equal_softmax_of_qk() -> None:
    vit = tiny_vit()
    fused = [m.fused_attn for m in vit.modules() if hasattr(m, "fused_attn")]
    assert fused and all(fused)  # timm fuses attention by default: the switch below is exercised
    x = torch.randn(2, 3, 56, 84)  # a 4 x 6 patch grid, through the dynamic position embedding
    inputs: dict = {}
    with torch.no_grad():
        before = vit(x)
        with capture_attention(vit) as capture:
            assert not any(m.fused_attn for m in vit.modules() if hasattr(m, "fused_attn"))
            handles = block_inputs(vit.blocks, "block", inputs)
            inside = vit(x)
            maps = capture.maps()
            for handle in handles:
                handle.remove()
        after = vit(x)
    torch.testing.assert_close(inside, before, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, before)
    assert [m.fused_attn for m in vit.modules() if hasattr(m, "fused_attn")] == fused
    assert hooks_left(vit) == 0
    prefix = 1 + 4  # class token and registers
    for i, block in enumerate(vit.blocks):
        with torch.no_grad():
            tokens = block.norm1(inputs["block", i])
            q, k, _ = block.attn.qkv(tokens).unflatten(-1, (3, HEADS, HEAD_DIM)).permute(2, 0, 3, 1, 4)
            attention = torch.softmax(q @ k.transpose(-2, -1) * HEAD_DIM**-0.5, dim=-1)  # (B, heads, N, N)
        patches = attention[:, :, 0, prefix:]
        expected = (patches / patches.sum(-1, keepdim=True)).unflatten(-1, (4, 6))
        np.testing.assert_allclose(maps.cls[:, i], expected.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(maps.cls_patch_mass[:, i], patches.sum(-1).numpy(), rtol=1e-4)


def test_capture_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ConfigError, match="eval mode"), capture_attention(tiny_vit().train()):
        pass
    with pytest.raises(ConfigError, match="timm ViT or XCiT"), capture_attention(nn.Linear(2, 2).eval()):
        pass


# ---- XCiT --------------------------------------------------------------------------------------


def constructed_tokens(model: Xcit, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace the conv stem's output by tokens the test chooses (the stem's grid is kept)."""
    model.patch_embed.register_forward_hook(lambda _m, _a, output: (make(output[0]), output[1]))


def test_xcit_class_attention_and_token_norms_peak_on_the_constructed_token() -> None:
    xcit = tiny_xcit(use_pos_embed=False)
    bright = 9  # row 2, column 1 of the 4 x 4 grid
    e0 = F.one_hot(torch.tensor(0), DIM).float()

    def one_bright_token(tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(tokens)
        out[:, bright] = e0
        return out

    constructed_tokens(xcit, one_bright_token)
    with torch.no_grad():
        for block in xcit.blocks:  # the XCA blocks pass their input on unchanged
            for gamma in (block.gamma1, block.gamma2, block.gamma3):
                gamma.zero_()
        xcit.blocks[0].attn.qkv.weight.copy_(torch.eye(DIM).repeat(3, 1))  # q = k = v = the normalised token
        xcit.blocks[0].attn.qkv.bias.zero_()
        xcit.cls_token.copy_(e0)
        attention = xcit.cls_attn_blocks[0].attn
        for layer in (attention.q, attention.k):
            layer.weight.copy_(10 * torch.eye(DIM))
            layer.bias.zero_()
        with capture_attention(xcit) as capture:
            xcit(torch.zeros(1, 3, 32, 32))
            maps = capture.maps()
    assert maps.architecture == "xcit" and maps.cls.shape == (1, 2, HEADS, 4, 4)
    for head in range(HEADS):
        assert maps.cls[0, 0, head].reshape(-1).argmax() == bright and maps.cls[0, 0, head].max() > 0.99
    norms = maps.token_norms[0, 0].reshape(HEADS, -1)  # block 0: only the bright token has an output
    assert (norms.argmax(axis=1) == bright).all() and np.delete(norms, bright, axis=1).max() < 1e-6


def test_xcit_channel_attention_is_near_identity_when_q_equals_k() -> None:
    xcit = tiny_xcit()
    generator = torch.Generator().manual_seed(1)
    constructed_tokens(xcit, lambda tokens: torch.randn(tokens.shape, generator=generator))
    inputs: dict = {}
    block_inputs(xcit.blocks, "xca", inputs)
    with torch.no_grad():
        attention = xcit.blocks[0].attn
        attention.qkv.weight.copy_(torch.eye(DIM).repeat(3, 1))
        attention.qkv.bias.zero_()
        attention.temperature.fill_(50.0)  # softmax(50 x cosine): a channel attends to itself alone
        with capture_attention(xcit) as capture:
            xcit(torch.zeros(1, 3, 32, 32))
            maps = capture.maps()
        normalised = xcit.blocks[0].norm1(inputs["xca", 0])
    channels = maps.channel_attention[0, 0]
    assert channels.shape == (HEADS, HEAD_DIM, HEAD_DIM)
    assert np.diagonal(channels, axis1=-2, axis2=-1).min() > 0.99
    expected = normalised[0].unflatten(-1, (HEADS, HEAD_DIM)).norm(dim=-1).T  # attention ~ I: the output is v
    np.testing.assert_allclose(maps.token_norms[0, 0].reshape(HEADS, -1), expected.numpy(), rtol=1e-3)


def test_xcit_views_equal_a_direct_computation_from_the_block_weights() -> None:
    xcit = tiny_xcit()
    with torch.no_grad():
        for block in xcit.blocks:
            block.attn.temperature.copy_(torch.rand(HEADS, 1, 1) * 2 + 0.5)
    inputs: dict = {}
    block_inputs(xcit.blocks, "xca", inputs)
    block_inputs(xcit.cls_attn_blocks, "ca", inputs)
    x = torch.randn(2, 3, 32, 48)  # a 4 x 6 grid
    with torch.no_grad():
        before = xcit(x)
        with capture_attention(xcit) as capture:
            inside = xcit(x)
            maps = capture.maps()
        torch.testing.assert_close(inside, before, rtol=1e-5, atol=1e-6)
        for i, block in enumerate(xcit.blocks):
            tokens = block.norm1(inputs["xca", i])
            q, k, v = block.attn.qkv(tokens).unflatten(-1, (3, HEADS, HEAD_DIM)).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
            q, k = F.normalize(q, dim=2), F.normalize(k, dim=2)  # each channel over the tokens
            matrix = torch.softmax(torch.einsum("bhnc,bhne->bhce", q, k) * block.attn.temperature, dim=-1)
            output = torch.einsum("bhce,bhne->bhnc", matrix, v)  # each token's output vector per head
            np.testing.assert_allclose(maps.channel_attention[:, i], matrix.numpy(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(maps.token_norms[:, i], output.norm(dim=-1).unflatten(-1, (4, 6)).numpy(),
                                       rtol=1e-4, atol=1e-6)
        for i, block in enumerate(xcit.cls_attn_blocks):
            tokens = block.norm1(inputs["ca", i])
            q = block.attn.q(tokens[:, 0]).unflatten(-1, (HEADS, HEAD_DIM))
            k = block.attn.k(tokens).unflatten(-1, (HEADS, HEAD_DIM))
            row = torch.softmax(torch.einsum("bhd,bnhd->bhn", q, k) * HEAD_DIM**-0.5, dim=-1)[..., 1:]
            expected = (row / row.sum(-1, keepdim=True)).unflatten(-1, (4, 6))
            np.testing.assert_allclose(maps.cls[:, i], expected.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps.cls.sum(axis=(-1, -2)), 1.0, rtol=1e-5)  # per image, block and head
    assert maps.cls.shape == (2, 2, HEADS, 4, 6) and maps.token_norms.shape == (2, 2, HEADS, 4, 6)


# ---- thresholds, heatmaps ------------------------------------------------------------------------


def test_top_mass_mask_keeps_the_fraction_with_the_fewest_patches() -> None:
    rng = np.random.default_rng(0)
    maps = rng.dirichlet(np.full(35, 0.3), size=(3, 4)).reshape(3, 4, 5, 7)
    mask = top_mass_mask(maps, 0.6)
    for m, keep in zip(maps.reshape(-1, 35), mask.reshape(-1, 35)):
        ranked = np.sort(m)[::-1]
        fewest = int(np.searchsorted(np.cumsum(ranked), 0.6 * m.sum())) + 1  # smallest k with top-k mass >= 0.6
        assert keep.sum() == fewest and m[keep].sum() >= 0.6 * m.sum()
        assert m[keep].min() >= m[~keep].max()  # the largest ones
        # DINO's visualize_attention: ascending sort, keep where the cumulative share exceeds 1 - threshold
        order = np.argsort(m)
        dino = np.zeros(35, bool)
        dino[order] = np.cumsum(m[order] / m.sum()) > 1 - 0.6
        np.testing.assert_array_equal(keep, dino)
    assert top_mass_mask(maps, 1.0).all()
    with pytest.raises(ConfigError, match="threshold"):
        top_mass_mask(maps, 1.5)


def test_heatmap_puts_each_tile_value_at_its_coordinates() -> None:
    heat = Heatmap((1000, 800), (100, 80))  # 10 level-0 pixels per canvas pixel
    expected = np.full((80, 100), np.nan)
    tiles = [(0, 0, 100, 1.0), (300, 200, 100, 2.0), (500, 400, 400, 4.0),  # a level-2 tile: 100 px x 4
             (900, 700, 200, 3.0)]  # hangs over the slide's corner: clipped
    for x, y, side, value in tiles:
        heat.add(x, y, side, value)
        expected[y // 10 : (y + side) // 10, x // 10 : (x + side) // 10] = value
    heat.add(0, 0, 100, 3.0)  # a second tile on the first: averaged
    expected[0:10, 0:10] = 2.0
    quadrants = np.array([[5.0, 6.0], [7.0, 8.0]])
    heat.add(600, 0, 200, quadrants)  # a tile's map spread over its footprint
    expected[0:10, 60:70], expected[0:10, 70:80], expected[10:20, 60:70], expected[10:20, 70:80] = quadrants.ravel()
    np.testing.assert_array_equal(heat.image()[..., 0], expected)

    classes = Heatmap((1000, 800), (100, 80), channels=3)
    labels = {(0, 0): 2, (100, 0): 0, (0, 100): 1}
    for (x, y), label in labels.items():
        classes.add(x, y, 100, np.eye(3)[label])
    image = classes.image()
    for (x, y), label in labels.items():
        assert (image[y // 10 : y // 10 + 10, x // 10 : x // 10 + 10].argmax(axis=-1) == label).all()
    assert np.isnan(image[50, 50]).all()
    with pytest.raises(ValueError, match="channels"):
        classes.add(0, 0, 100, 1.0)


def test_thumbnail_read_in_bands_equals_a_whole_image_resize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (203, 301, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "slide.png")
    monkeypatch.setattr(heatmaps, "BAND_BYTES", 3 * 301 * 10)  # ten source rows a band
    with open_slide(tmp_path / "slide.png") as slide:
        thumbnail = read_thumbnail(slide, 64)
    whole = np.asarray(Image.fromarray(pixels).resize((64, 43), Image.Resampling.BOX))
    assert thumbnail.shape == (43, 64, 3)
    assert np.abs(thumbnail.astype(int) - whole).max() <= 1


def test_pca_colours_are_scikit_learns_pca_read_in_chunks() -> None:
    rng = np.random.default_rng(0)
    embeddings = (rng.normal(size=(200, 16)) * np.linspace(4, 0.2, 16) + 50).astype(np.float32)  # a large mean
    colours = pca_colours(embeddings, batch_rows=16)
    pca = PCA(3).fit(embeddings.astype(np.float64))
    signs = np.sign(pca.components_[np.arange(3), np.abs(pca.components_).argmax(axis=1)])  # largest loading > 0
    reference = pca.transform(embeddings.astype(np.float64)) * signs
    reference = (reference - reference.min(axis=0)) / np.ptp(reference, axis=0)
    np.testing.assert_allclose(colours, reference, atol=1e-4)
    assert not pca_colours(embeddings[:1]).any()


# ---- bony attention ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Bony export of a randomly initialised XCiT-nano fed 64-px tiles (a 4 x 4 grid)."""
    out = tmp_path_factory.mktemp("export")
    backbone = create_backbone("xcit_nano_12_p16_224", seed=0)
    head = DINOHead(backbone.num_features, 16, hidden_dim=16, bottleneck_dim=8)
    export_encoder(backbone, head, name="xcit_nano_12_p16_224", input_size=64, mean=[0.485, 0.456, 0.406],
                   std=[0.229, 0.224, 0.225], out=out, step=0)
    return out


@pytest.fixture
def tile_png(tmp_path: Path) -> Path:
    path = tmp_path / "tile one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), np.uint8)).save(path)
    return path


def test_help_explains_every_option() -> None:
    sub = build_parser()._subparsers._group_actions[0].choices["attention"]  # type: ignore[union-attr]
    text = sub.format_help()
    for key, _, explanation in describe(AttentionConfig):
        assert f"{key}=" in text and explanation.split()[0] in text, key
    assert all(action.help for action in sub._actions)


def test_cli_on_an_image_with_a_vit_and_an_xcit(tmp_path: Path, tile_png: Path, export: Path) -> None:
    out = tmp_path / "out"
    assert main(["attention", "random:vit_tiny_patch16_224:0", str(tile_png), "--out", str(out), "--block", "5",
                 "--threshold", "0.6"]) == 0
    cls = np.load(out / "tile one.cls.npy")
    assert cls.shape == (12, 3, 14, 14)  # every block, ViT-tiny's 3 heads, 224 / 16
    np.testing.assert_allclose(cls.sum(axis=(-1, -2)), 1.0, rtol=1e-4)
    meta = json.loads((out / "tile one.json").read_text())
    assert (meta["architecture"], meta["block"], meta["threshold"], meta["grid"]) == ("vit", 5, 0.6, [14, 14])
    assert Image.open(out / "tile one.cls.png").size[0] > 0

    assert main(["attention", str(export), str(tile_png), "--out", str(out)]) == 0
    assert np.load(out / "tile one.cls.npy").shape == (2, 4, 4, 4)  # 2 class-attention blocks, 4 heads, 64 / 16
    assert np.load(out / "tile one.token_norms.npy").shape == (12, 4, 4, 4)
    channels = np.load(out / "tile one.channel_attention.npy")
    assert channels.shape == (12, 4, 32, 32)
    np.testing.assert_allclose(channels.sum(axis=-1), 1.0, rtol=1e-4)
    views = ("cls", "token_norms", "channel_attention")
    assert {p.name for p in out.glob("*.png")} == {f"tile one.{v}.png" for v in views}

    # finer maps from a larger input than the export's 64 px, as DINO draws them
    assert main(["attention", str(export), str(tile_png), "--out", str(out), "input_size=128"]) == 0
    assert np.load(out / "tile one.cls.npy").shape == (2, 4, 8, 8)
    assert json.loads((out / "tile one.json").read_text())["input_size"] == 128
    arrays_only = tmp_path / "arrays"
    assert main(["attention", str(export), str(tile_png), "--out", str(arrays_only), "figures=false"]) == 0
    assert {p.name for p in arrays_only.iterdir()} == {f"tile one.{v}.npy" for v in views} | {"tile one.json"}
    assert json.loads((arrays_only / "tile one.json").read_text())["files"] == [f"tile one.{v}.npy" for v in views]


def test_cli_on_a_folder_maps_each_image_and_names_the_ones_it_cannot(tmp_path: Path, tile_png: Path, export: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    alone = tmp_path / "alone"
    assert main(["attention", str(export), str(tile_png), "--out", str(alone), "figures=false"]) == 0
    folder = tmp_path / "tiles"
    folder.mkdir()
    tile_png.rename(folder / "a.png")
    Image.fromarray(np.full((80, 80, 3), 200, np.uint8)).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image: left alone")
    out = tmp_path / "out"
    assert main(["attention", str(export), str(folder), "--out", str(out), "figures=false"]) == 0
    assert sorted(p.name for p in out.glob("*.cls.npy")) == ["a.cls.npy", "b.cls.npy"]
    # the same maps as the image on its own: one encoder for the folder changes nothing
    np.testing.assert_array_equal(np.load(out / "a.cls.npy"), np.load(alone / "tile one.cls.npy"))

    (folder / "c.png").write_bytes(b"\x89PNG broken")
    (folder / ".hidden.png").write_bytes((folder / "a.png").read_bytes())
    again = tmp_path / "again"
    assert main(["attention", str(export), str(folder), "--out", str(again), "figures=false"]) == 2
    err = capsys.readouterr().err
    assert "2 of 4 images not mapped" in err and ".hidden.png: slide id" in err
    assert sorted(p.name for p in again.glob("*.cls.npy")) == ["a.cls.npy", "b.cls.npy"], "the good ones are kept"
    assert main(["attention", str(export), str(folder), "--out", str(again), "--manifest", str(folder / "a.png")]) == 2
    assert "give that slide, not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["attention", str(export), str(empty), "--out", str(again)]) == 2
    assert "no tile images" in capsys.readouterr().err
    assert main(["attention", str(export), str(folder), "--out", str(folder)]) == 2
    assert "--out is the folder of images" in capsys.readouterr().err
    (folder / "c.png").unlink()
    Image.fromarray(np.full((80, 80, 3), 90, np.uint8)).save(folder / "b.png")
    assert main(["attention", str(export), str(folder), "--out", str(tmp_path / "clash")]) == 2
    assert "b.jpg and b.png would write the same maps (b.*)" in capsys.readouterr().err
    assert not (tmp_path / "clash").exists() or not list((tmp_path / "clash").iterdir())


def test_tile_maps_are_the_written_maps_of_the_images_as_the_encoder_saw_them(tmp_path: Path, export: Path) -> None:
    from bonylib.attention.command import AttentionConfig, tile_maps
    from bonylib.attention.figures import attention_tiles

    folder = tmp_path / "tiles"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("b", "a"):
        Image.fromarray(rng.integers(0, 256, (100, 100, 3), np.uint8)).save(folder / f"{name}.png")
    found = tile_maps(str(export), folder, tmp_path / "out", AttentionConfig(input_size=96), block=0)
    assert found.names == ["a", "b"]
    for name, tile, heat in zip(found.names, found.tiles, found.maps):
        expected = np.asarray(Image.open(folder / f"{name}.png").resize((96, 96), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(tile, expected)
        np.testing.assert_allclose(heat, np.load(tmp_path / "out" / f"{name}.cls.npy")[0].mean(axis=0))
        assert heat.shape == (6, 6) and np.isclose(heat.sum(), 1.0, atol=1e-5)
    assert not list((tmp_path / "out").glob("*.png")), "arrays only"
    figure = attention_tiles({"teacher": found, "again": found}, threshold=0.6)
    assert len([ax for ax in figure.axes if ax.images]) == 6  # the tiles, then a row per encoder
    other = dataclasses.replace(found, names=["a", "c"])
    with pytest.raises(ValueError, match="maps of other are of other images"):
        attention_tiles({"teacher": found, "other": other})


def test_cli_refuses_bad_input(tmp_path: Path, tile_png: Path, export: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    hidden = tile_png.with_name(".hidden.png")
    tile_png.rename(hidden)
    out = tmp_path / "out"
    assert main(["attention", str(export), str(hidden), "--out", str(out)]) == 2
    assert "not a safe file name" in capsys.readouterr().err
    assert main(["attention", str(export), str(hidden), "--out", str(out), "--threshold", "1.5"]) == 2
    assert "threshold must be in (0, 1]" in capsys.readouterr().err
    hidden.rename(tile_png)
    assert main(["attention", str(export), str(tile_png), "--out", str(out), "--block", "2"]) == 2
    assert "the model has 2 class-attention blocks" in capsys.readouterr().err
    assert main(["attention", str(export), str(tile_png), "--out", str(out), "input_size=8"]) == 2
    assert "input_size must be 0 (the encoder's own) or at least 16" in capsys.readouterr().err
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame({"slide_id": ["../escape"], "x": [0], "y": [0], "level": [0], "size": [64],
                  "path": [str(tile_png)]}).to_parquet(manifest)
    assert main(["attention", str(export), str(tile_png), "--out", str(out), "--manifest", str(manifest)]) == 2
    assert "not a safe file name" in capsys.readouterr().err
    assert main(["attention", str(export), str(export / "teacher_backbone.json"), "--out", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    other = tmp_path / "other.png"
    Image.new("RGB", (64, 64), "white").save(other)
    assert main(["attention", str(export), str(other), "--out", str(out), "--manifest", str(manifest)]) == 2
    assert "no tiles of" in capsys.readouterr().err
    assert not list(out.glob("*.npy")) and not list(tmp_path.glob("escape*"))


def test_class_heatmap_figure(tmp_path: Path) -> None:
    from bonylib import plotting

    classes = Heatmap((400, 200), (40, 20), channels=3)
    for x, label in ((0, 0), (100, 1), (200, 2)):
        classes.add(x, 0, 100, np.eye(3)[label])
    names = ["benign", "G3", "G4"]
    colours = plotting.class_colours(classes.image(), names)
    np.testing.assert_allclose(colours[5, 15], np.array(plotting.CLASS_COLOURS["G3"]) / 255)
    assert np.isnan(colours[5, 35]).all()
    figure = plotting.slide_heatmap(np.full((20, 40, 3), 255, np.uint8), colours, "classes", names=names)
    png = plotting.save_figure(figure, tmp_path / "classes.png")
    assert Image.open(png).size[0] > 0


def test_cli_on_a_real_scan_stitches_tiles_at_their_coordinates(tmp_path: Path, shared_data: Path,
                                                                 export: Path) -> None:
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    out = tmp_path / "out"
    options = ["thumbnail_px=256", "batch_size=32"]  # one forward pass per run
    assert main(["attention", str(export), str(slide), "--out", str(out), *options,
                 "tile.mpp=null", "tile.level=0", "tile.tile_px=512"]) == 0
    name = "CMU-1-Small-Region"
    tiles = pd.read_parquet(out / f"{name}.tiles.parquet")
    attention = np.load(out / f"{name}.attention.npy")
    with open_slide(slide) as reader:
        width, height = reader.level_dimensions[0]
    assert attention.shape == (256, round(width * 256 / height))  # the thumbnail: longest side 256
    scale_y, scale_x = attention.shape[0] / height, attention.shape[1] / width
    covered = np.zeros(attention.shape, bool)  # the footprints, drawn here from the tiles' coordinates
    for row in tiles.itertuples():
        covered[round(row.y * scale_y) : round((row.y + row.size) * scale_y),
                round(row.x * scale_x) : round((row.x + row.size) * scale_x)] = True
    assert 0 < len(tiles) <= 20 and np.array_equal(~np.isnan(attention), covered)
    assert np.nanmin(attention) >= 0.0
    per_tile = np.load(out / f"{name}.tiles.cls.npy")
    assert per_tile.shape == (len(tiles), 4, 4, 4)
    np.testing.assert_allclose(per_tile.sum(axis=(-1, -2)), 1.0, rtol=1e-4)
    assert np.load(out / f"{name}.tiles.embeddings.npy").shape == (len(tiles), 128)
    pca = np.load(out / f"{name}.pca.npy")
    assert np.array_equal(~np.isnan(pca[..., 0]), covered) and np.nanmax(pca) <= 1.0

    again = tmp_path / "again"
    assert main(["attention", str(export), str(slide), "--out", str(again), *options,
                 "--manifest", str(out / "tiles" / "manifest.parquet")]) == 0
    np.testing.assert_array_equal(np.load(again / f"{name}.attention.npy"), attention)
    assert not (again / "tiles").exists()


def test_a_backbone_behind_the_wavelet_stem_has_the_plain_models_grid() -> None:
    from bonylib.models.backbones import create_backbone

    for name in ("xcit_nano_12_p16_224", "vit_tiny_patch16_224"):
        model = create_backbone(name, seed=0, stem="haar_bands").eval()
        with capture_attention(model) as capture, torch.inference_mode():
            model(torch.randn(1, 3, 64, 64))
        maps = capture.maps()
        assert maps.cls.shape[-2:] == (4, 4), name
        np.testing.assert_allclose(maps.cls.sum(axis=(-2, -1)), 1.0, rtol=1e-4)
