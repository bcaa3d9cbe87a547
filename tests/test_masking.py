"""iBOT's masks and the masked student: the block masks have DINOv2's statistics, and what a masked patch's pixels can
reach is what ``bonylib.models.backbones.mask_embeddings`` says (nothing, once the patches are hidden)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonylib.models.backbones import backbone_tokens, create_backbone, patch_pixels
from bonylib.models.head import DINOHead, MultiCropWrapper
from bonylib.ssl.data import SeededViews, collate_views
from bonylib.ssl.masking import BlockMasking


def masks_of(grid: tuple[int, int], crops: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return BlockMasking(grid)(crops)


def test_block_masks_have_dinov2s_statistics() -> None:
    """Half of the crops masked, each hiding a share of its patches spread over 0.1-0.5 (mean 0.3), never more than
    the share drawn, laid as blocks: a masked patch nearly always has a masked neighbour, which scattered masks of
    the same share give only about 1 - 0.7^4 of the time."""
    rows = cols = 14
    masks = masks_of((rows, cols), 4000)
    counts = masks.flatten(1).sum(1).numpy()
    masked = counts > 0
    assert abs(masked.mean() - 0.5) < 4 * np.sqrt(0.25 / 4000)
    shares = counts[masked] / (rows * cols)
    assert shares.max() <= 0.5 and shares.min() >= 0.09, "at most int(0.5 N), and the fill reaches (almost) its share"
    assert abs(shares.mean() - 0.2974) < 0.01, "uniform 0.1-0.5, truncated to whole patches: 0.3 - 0.5 / 196"
    assert 0.2 < np.mean(shares < 0.2) < 0.3 and 0.2 < np.mean(shares > 0.4) < 0.3, "a quarter below 0.2, one above 0.4"
    padded = np.pad(masks[masked].numpy(), ((0, 0), (1, 1), (1, 1)))
    neighbours = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    with_neighbour = (neighbours & masks[masked].numpy()).sum() / masks[masked].sum().item()
    assert with_neighbour > 0.97


def test_masks_come_with_the_sample_whatever_the_batch() -> None:
    """Masks are drawn from the sample's own seeded generator (after its crops): a sample's masks are the same in
    any batch, and a run without masks draws the crops it always drew."""
    images = [(torch.zeros(3, 8, 8, dtype=torch.uint8), i) for i in range(6)]

    def transform(image: torch.Tensor) -> list[torch.Tensor]:
        return [torch.rand(3, 4, 4) for _ in range(3)]

    masked = SeededViews(images, transform, seed=3, masking=BlockMasking((6, 6), probability=1.0), global_crops=2)
    plain = SeededViews(images, transform, seed=3)
    assert masked[4].masks.shape == (2, 6, 6) and masked[4].masks.any()
    for i in range(6):
        assert all(torch.equal(a, b) for a, b in zip(masked[i].crops, plain[i].crops))
        assert plain[i].masks is None
    batch = collate_views([masked[i] for i in (4, 1, 2)])
    assert batch.masks.shape == (6, 6, 6)
    assert torch.equal(batch.masks[0], masked[4].masks[0]) and torch.equal(batch.masks[3], masked[4].masks[1]), \
        "crop by crop, as torch.cat(crops[:2]) stacks them"
    assert torch.equal(collate_views([masked[2]]).masks, masked[2].masks)


def _student(name: str) -> MultiCropWrapper:
    torch.manual_seed(0)
    backbone = create_backbone(name)
    network = MultiCropWrapper(backbone, DINOHead(backbone.num_features, 32, 32, 16), masked_modelling=True)
    with torch.no_grad():
        network.mask_token.normal_()  # a trained token, not zeros: replaced embeddings differ from blank ones
    return network


def _changed(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per patch token of image 0: whether the two passes' outputs differ at all."""
    return (a[1][0] != b[1][0]).any(dim=-1).reshape(4, 4)


@pytest.mark.parametrize("train", [True, False], ids=["train-mode", "eval-mode"])
def test_what_a_masked_patch_leaks_is_what_the_docs_say(train: bool) -> None:
    """Two 64-px images, 4 x 4 patches; image 0 has the 2 x 2 block at rows and columns 1-2 masked. The pixels of
    its masked patch (2, 2) (bottom-right of the block, whose right and lower neighbours are unmasked) are changed.

    - The student as it trains (patches hidden, then the mask token): every output, bit for bit, is unchanged, for
      XCiT and ViT, in training mode (batch statistics) too.
    - The mask token alone (DINOv2's recipe) on ViT: unchanged as well (a patch's embedding sees only its pixels).
    - The mask token alone on XCiT: a change in the patch's interior (pixel 40, 40) reaches its unmasked right and
      lower neighbours through the conv stem's 31-px receptive field, then the masked token itself through the
      blocks; a change of its first pixel (32, 32), which no other token's receptive field covers, reaches nothing
      in eval mode, and everything through the stem's BatchNorm statistics in training mode."""
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    interior, first = images.clone(), images.clone()
    interior[0, :, 40, 40] += 5.0
    first[0, :, 32, 32] += 5.0
    for name in ("xcit_nano_12_p16_224", "vit_tiny_patch16_224"):
        student = _student(name).train(train)
        assert patch_pixels(student.backbone) == 16
        with torch.no_grad():
            trained = [student([x], masks) for x in (images, interior, first)]
            for other in trained[1:]:
                for part in ("cls", "head", "masked"):
                    assert torch.equal(getattr(trained[0], part), getattr(other, part)), (name, part)
                assert torch.equal(trained[0].patch[0], other.patch[0]), name
            alone = [backbone_tokens(student.backbone, x, masks, student.mask_token) for x in (images, interior, first)]
        if name.startswith("vit"):
            assert not _changed(alone[0], alone[1]).any() and not _changed(alone[0], alone[2]).any()
            continue
        leaked = _changed(alone[0], alone[1])
        assert leaked[2, 2], "the masked patch's own prediction sees its pixels through its unmasked neighbours"
        assert torch.equal(alone[0][0][1], alone[1][0][1]) != train, "image 1 moves through batch statistics only"
        corner = _changed(alone[0], alone[2])
        if train:
            assert corner.all(), "batch statistics of the stem's BatchNorm carry every pixel to every token"
            assert not torch.equal(alone[0][1][1], alone[2][1][1]), "...of every image of the batch"
        else:
            assert not corner.any(), "pixel (32, 32) is in no other token's receptive field"
            with torch.no_grad():
                stem = student.backbone.patch_embed
                embedded = [stem(x)[0][0].reshape(4, 4, -1) for x in (images, interior)]
            moved = (embedded[0] != embedded[1]).any(dim=-1)
            assert moved.nonzero().tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]], \
                "the patch itself and its right, lower and lower-right neighbours embed pixel (40, 40)"
