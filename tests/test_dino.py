"""DINO pieces against the paper's formulas, computed here independently with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bonylib.models.backbones import create_backbone, no_weight_decay, parameter_groups
from bonylib.models.head import DINOHead, MultiCropWrapper
from bonylib.ssl.ema import update_teacher
from bonylib.ssl.losses.dino import DINOLoss, crop_pairs
from bonylib.ssl.schedules import cosine_schedule, teacher_temperature_schedule


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def paper_loss(student: np.ndarray, teacher: np.ndarray, center: np.ndarray, tau_s: float, tau_t: float,
               n_global: int, n_crops: int) -> float:
    """Eq. 1-3 of Caron et al.: mean over (teacher global view t, student view s != t) of
    -sum P_t log P_s, P_t = softmax((g_t - c) / tau_t), P_s = softmax(g_s / tau_s)."""
    s_views = np.split(student, n_crops)
    t_views = np.split(teacher, n_global)
    losses = []
    for t in range(n_global):
        p_t = softmax((t_views[t] - center) / tau_t)
        for s in range(n_crops):
            if s == t and n_global > 1:
                continue
            log_p_s = np.log(softmax(s_views[s] / tau_s))
            losses.append(np.mean(np.sum(-p_t * log_p_s, axis=-1)))
    return float(np.mean(losses))


@pytest.mark.parametrize(("n_global", "n_crops"), [(2, 10), (1, 6), (2, 2)])
def test_loss_matches_the_paper(n_global: int, n_crops: int) -> None:
    rng = np.random.default_rng(0)
    batch, k = 4, 32
    student = rng.normal(size=(n_crops * batch, k)).astype(np.float32)
    teacher = rng.normal(size=(n_global * batch, k)).astype(np.float32)
    loss = DINOLoss(k, n_global, n_crops, epochs=10, warmup_teacher_temp=0.04, teacher_temp=0.07,
                    warmup_teacher_temp_epochs=5)
    center = rng.normal(size=(1, k)).astype(np.float32)
    loss.centering.center.copy_(torch.from_numpy(center))
    got = loss.distill(torch.from_numpy(student), torch.from_numpy(teacher), epoch=2).item()
    tau_t = 0.04 + (0.07 - 0.04) * 2 / 4  # linspace(0.04, 0.07, 5)[2]
    assert got == pytest.approx(paper_loss(student, teacher, center, 0.1, tau_t, n_global, n_crops), rel=1e-5)
    # the center moved towards this batch's teacher mean by (1 - 0.9)
    expected_center = 0.9 * center + 0.1 * teacher.mean(axis=0, keepdims=True)
    np.testing.assert_allclose(loss.centering.center.numpy(), expected_center, rtol=1e-5, atol=1e-6)


def test_pairs() -> None:
    assert crop_pairs(2, 4) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    assert crop_pairs(1, 6) == [(0, s) for s in range(6)], "with one global crop no student crop is left without a target"


def test_collapse_to_uniform_costs_log_k() -> None:
    k = 4096
    loss = DINOLoss(k, 2, 4, epochs=1)
    same = torch.zeros(4 * 3, k)
    assert loss.distill(same, torch.zeros(2 * 3, k), 0).item() == pytest.approx(math.log(k), rel=1e-6), "ln(4096) = 8.318"


def test_cosine_schedule_values() -> None:
    values = cosine_schedule(1.0, 0.1, epochs=4, steps_per_epoch=5, warmup_epochs=1, warmup_start=0.0)
    assert len(values) == 20
    np.testing.assert_allclose(values[:5], [0.0, 0.2, 0.4, 0.6, 0.8])
    assert values[5] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    middle = 5 + 7  # halfway through the 15 cosine steps (0..14)
    assert values[middle] == pytest.approx(0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * 7 / 14)))
    momentum = cosine_schedule(0.996, 1.0, epochs=3, steps_per_epoch=10)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] == pytest.approx(1.0)
    assert np.all(np.diff(momentum) >= 0)


def test_teacher_temperature_schedule() -> None:
    temps = teacher_temperature_schedule(0.04, 0.07, warmup_epochs=3, epochs=5)
    np.testing.assert_allclose(temps, [0.04, 0.055, 0.07, 0.07, 0.07])


def test_ema_update() -> None:
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    update_teacher(student, teacher, momentum=0.9)
    for name, param in teacher.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(student.named_parameters())[name].detach()
        torch.testing.assert_close(param, expected)


def test_head_shapes_and_frozen_norm() -> None:
    head = DINOHead(192, 1024, hidden_dim=64, bottleneck_dim=16)
    out = head(torch.randn(5, 192))
    assert out.shape == (5, 1024)
    rows = head.last_layer.weight
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(1024), rtol=1e-5, atol=1e-5)
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad
    assert DINOHead(8, 4, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad
    linear = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear] == [64, 64, 16], "3 layers to the bottleneck"


@pytest.mark.parametrize("name", ["xcit_nano_12_p16_224", "vit_tiny_patch16_224"])
def test_one_backbone_pass_per_resolution(name: str) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(name).eval()
    model = MultiCropWrapper(backbone, DINOHead(backbone.num_features, 64, hidden_dim=32, bottleneck_dim=16)).eval()
    crops = [torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224), torch.randn(2, 3, 96, 96), torch.randn(2, 3, 96, 96)]
    calls = []
    handle = backbone.patch_embed.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        together = model(crops).head
        handle.remove()
        one_by_one = torch.cat([model(c).head for c in crops])
    assert calls == [4, 4], "two passes: the global crops, then the local crops"
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-4)


def test_weight_decay_groups_leave_out_biases_norms_gains_and_xcit_temperature() -> None:
    model = create_backbone("xcit_nano_12_p16_224")
    groups = parameter_groups(model)
    decayed = {id(p) for p in groups[0]["params"]}
    for name, param in model.named_parameters():
        skip = name.endswith(".bias") or ".norm" in name or ".gamma" in name or name.endswith("temperature") \
            or param.ndim == 1
        assert (id(param) not in decayed) == skip, name
        assert no_weight_decay(name, param) == skip
    assert any(n.endswith("attn.temperature") for n, _ in model.named_parameters())
    assert groups[1]["weight_decay"] == 0.0


def test_channels_last_changes_the_memory_format_not_the_features() -> None:
    model = create_backbone("xcit_nano_12_p16_224", seed=0).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        assert model.patch_embed.proj[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_seeded_backbone_is_repeatable_and_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    a = create_backbone("vit_tiny_patch16_224", seed=1).state_dict()
    assert torch.equal(torch.rand(3), expected_next), "the global generator did not move"
    b = create_backbone("vit_tiny_patch16_224", seed=1).state_dict()
    c = create_backbone("vit_tiny_patch16_224", seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_centering_and_sharpening_each_prevent_one_collapse() -> None:
    from bonylib.ssl.collapse import toy_dino

    log_k = math.log(64)
    dino = toy_dino(centering=True, sharpening=True).tail(20).mean()
    assert dino.entropy < 0.5 * log_k and dino.mean_entropy > 0.5 * math.log(8), "confident and diverse"
    no_centering = toy_dino(centering=False, sharpening=True).tail(20).mean()
    assert no_centering.mean_entropy < 0.1, "one prototype for every image"
    no_sharpening = toy_dino(centering=True, sharpening=False).tail(20).mean()
    assert no_sharpening.entropy > 0.95 * log_k, "uniform targets"


@pytest.mark.parametrize(("nodelist", "host"), [
    ("node01", "node01"),
    ("node01,node02", "node01"),
    ("node[01-04]", "node01"),
    ("node[07,09-10],gpu[1-2]", "node07"),
    ("rack1-node[3-4]", "rack1-node3"),
    ("n[001-004]-ib", "n001-ib"),
])
def test_first_host_of_a_slurm_node_list(nodelist: str, host: str) -> None:
    from bonylib.ssl.distributed import first_host

    assert first_host(nodelist) == host


def test_slurm_rendezvous_without_scontrol_uses_the_first_real_host(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from bonylib.ssl import distributed

    def no_scontrol(*args, **kwargs):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(subprocess, "run", no_scontrol)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[012-015]")
    assert distributed._slurm_master() == "gpu012"
