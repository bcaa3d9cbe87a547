"""The report's experiments as sweeps: the files hold the arms the report names (checked against its sentences), an
arm is its base recipe plus its own keys and nothing else, the runners refuse what they cannot run in one line, and
two arms train for real through ``bony sweep`` and through ``slurm/sweep.sbatch``'s hand-over to pretrain.sbatch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from bonylib.cli import main
from bonylib.compose.pretrain import PretrainConfig
from bonylib.compose.sweeps import arm_config, pick_arm, read_sweep
from bonylib.config import flat_keys, load_config, to_dict
from bonylib.errors import ConfigError
from bonylib.ssl.losses.dino import crop_pairs

OUT_DIM_QUOTES = ("la valeur conseillée par les auteurs du papier DINO est de 65536",
                  "Nous avons testé quatre valeurs: 1024, 2048, 4096 et 8192",
                  "il est apparu que la valeur optimale était 4096")
"""§6.2.1: DINO's default failed first; the four values compared; the one kept."""
SINGLE_VIEW_QUOTES = ("j'ai utilisé cette fonction de coût pour entraîner un modèle ViT et les résultats étaient "
                      "mauvais avec une fonction de coût qui ne diminuait pas",
                      "$$min_{\\theta_s}H(P_t(x), P_s(x))$$",
                      "Algorithm 1 DINO PyTorch pseudocode w/o multi-crop",
                      "loss = H(t1, s2)/2 + H(t2, s1)/2",
                      "1 vue globale pour le teacher et 5 vues locales")
"""§4.2.1 and §4.2.4: the loss on one image x, the ViT it failed on; Algorithm 1 (two views, no multi-crop); the
seed's crops (§6.2.3)."""


def sweep_file(repo: Path, name: str) -> Path:
    return repo / "configs" / "pretrain" / "sweeps" / f"{name}.yaml"


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def test_the_reports_quotes_are_in_the_report(repo: Path) -> None:
    report = repo.parent / "shared" / "report" / "000_279bfb63f361bb68.txt"
    if not report.is_file():
        pytest.skip(f"{report}: the seed's report is not here")
    text = " ".join(report.read_text().split())
    for quote in (*OUT_DIM_QUOTES, *SINGLE_VIEW_QUOTES):
        assert " ".join(quote.split()) in text, quote


def test_the_out_dim_sweep_holds_the_values_the_report_tried(repo: Path) -> None:
    sweep = read_sweep(sweep_file(repo, "out_dim"))
    tried = numbers(OUT_DIM_QUOTES[1].split(":")[1])        # 1024, 2048, 4096 et 8192
    failed_default = numbers(OUT_DIM_QUOTES[0])[-1]         # 65536
    assert tried == [1024, 2048, 4096, 8192] and failed_default == 65536
    values = [arm_config(sweep, arm).model.out_dim for arm in sweep.arms]
    assert values == [*tried, failed_default]
    assert all(keys == (f"model.out_dim={value}",) for keys, value in zip(sweep.arms.values(), values))
    # the report's choice is its recipe's value: the 4096 arm is seed.yaml as it is
    assert numbers(OUT_DIM_QUOTES[2]) == [4096] == [load_config(PretrainConfig, sweep.base).model.out_dim]


def test_the_single_view_sweep_is_the_loss_the_report_describes(repo: Path) -> None:
    sweep = read_sweep(sweep_file(repo, "single_view"))
    crops = {arm: (arm_config(sweep, arm).crops.global_crops, arm_config(sweep, arm).crops.local_crops)
             for arm in sweep.arms}
    assert crops == {"single_view": (1, 0), "two_views": (2, 0), "multi_crop": (1, 5)}
    # the pairs of (teacher view, student view) each arm's loss sums: H(P_t(x), P_s(x)) on the one crop; Algorithm 1's
    # H(t1, s2) and H(t2, s1); the seed's global crop against itself and each of its 5 local crops
    pairs = {arm: crop_pairs(g, g + l) for arm, (g, l) in crops.items()}
    assert pairs == {"single_view": [(0, 0)], "two_views": [(0, 1), (1, 0)],
                     "multi_crop": [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5)]}
    assert numbers(SINGLE_VIEW_QUOTES[4])[:2] == [1, 5]
    # "un modèle ViT", which one unsaid: DINO's default --arch vit_small, on every arm
    assert {arm_config(sweep, arm).model.backbone for arm in sweep.arms} == {"vit_small_patch16_224"}


@pytest.mark.parametrize("name", ["out_dim", "single_view"])
@pytest.mark.parametrize("base", [None, "demo.yaml"])
def test_an_arm_is_its_base_recipe_plus_its_own_keys_only(repo: Path, name: str, base: str | None) -> None:
    sweep = read_sweep(sweep_file(repo, name))
    recipe = sweep.base if base is None else repo / "configs" / "pretrain" / base
    # the base as the sweep runs it: the recipe with the keys every arm shares
    shared = flat_keys(to_dict(load_config(PretrainConfig, recipe, list(sweep.overrides))))
    for arm, keys in sweep.arms.items():
        config = flat_keys(to_dict(arm_config(sweep, arm, None if base is None else recipe)))
        changed = {key for key in config if config[key] != shared[key]}
        expected = {item.partition("=")[0]: yaml.safe_load(item.partition("=")[2]) for item in keys}
        assert changed <= set(expected), (arm, changed - set(expected))
        assert {key: config[key] for key in expected} == expected, arm


def test_arms_are_picked_by_name_or_index(repo: Path) -> None:
    sweep = read_sweep(sweep_file(repo, "out_dim"))
    assert [pick_arm(sweep, i) for i in range(5)] == list(sweep.arms)
    assert pick_arm(sweep, "3") == pick_arm(sweep, "out_dim_8192") == "out_dim_8192"


def one_line(message: str, *needles: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("arm", ["5", "out_dim_512", "-1"])
def test_bony_sweep_refuses_an_arm_the_file_has_not(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    arm: str) -> None:
    path = sweep_file(repo, "out_dim")
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs"), "--arm", arm]) == 2
    err = capsys.readouterr().err
    one_line(err, "bony sweep: error:", str(path), "0: out_dim_1024", "4: out_dim_65536")
    assert not (tmp_path / "runs").exists()


def test_an_override_of_a_key_an_arm_studies_is_refused(repo: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", str(sweep_file(repo, "out_dim")), "--out", str(tmp_path / "runs"), "model.out_dim=256"]) == 2
    one_line(capsys.readouterr().err, "model.out_dim", "arm out_dim_1024", "no longer be what the sweep compares")
    assert main(["sweep", str(sweep_file(repo, "out_dim")), "--out", str(tmp_path / "runs"), "--print"]) == 2
    one_line(capsys.readouterr().err, "--print needs exactly one --arm")


@pytest.mark.parametrize(("text", "needle"), [
    ("base: ../seed.yaml\narms: [model.out_dim=1]\n", "arms must map each arm's name"),
    ("arms: {a: [model.out_dim=1]}\n", "base must name the pretraining recipe"),
    ("base: ../seed.yaml\nseeds: 3\narms: {a: []}\n", "unknown key 'seeds'"),
    ("base: ../seed.yaml\narms: {a: model.out_dim=1}\n", "arms.a must be a list of key=value overrides"),
    ("base: ../seed.yaml\narms: {../a: [model.out_dim=1]}\n", "arm name '../a'"),
    ("base: ../seed.yaml\narms: {a: [model.out_dim=1, model.out_dim=2]}\n", "arms.a sets a key twice: model.out_dim"),
    ("base: ../seed.yaml\noverrides: [model.out_dim=8]\narms: {a: [model.out_dim=1]}\n", "arm a sets model.out_dim"),
    ("base: ../seed.yaml\narms: {a: [model.out_dims=1]}\n", "arm a: override 'model.out_dims=1': unknown key"),
    ("base: ../nothing.yaml\narms: {a: []}\n", "config file not found"),
])
def test_a_broken_sweep_file_is_one_line_naming_it(repo: Path, tmp_path: Path, text: str, needle: str) -> None:
    folder = tmp_path / "sweeps"
    folder.mkdir()
    (tmp_path / "seed.yaml").write_text((repo / "configs" / "pretrain" / "seed.yaml").read_text())
    path = folder / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        read_sweep(path)
    one_line(str(caught.value), str(path), needle)


def test_two_arms_train_and_a_rerun_resumes_them(repo: Path, images: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Two arms of the out_dim sweep at the smoke scale (its recipe as the base), by index and by name."""
    args = ["sweep", str(sweep_file(repo, "out_dim")), "--config", str(repo / "configs" / "pretrain" / "smoke.yaml"),
            "--out", str(tmp_path / "runs"), "--arm", "0", "--arm", "out_dim_65536", f"data.images={images}",
            "max_steps=2", "data.workers=0"]
    assert main(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "runs" / "out_dim_1024"), str(tmp_path / "runs" / "out_dim_65536")]
    for arm, out_dim in (("out_dim_1024", 1024), ("out_dim_65536", 65536)):
        run = tmp_path / "runs" / arm
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["model"]["out_dim"] == out_dim and saved["model"]["backbone"] == "vit_tiny_patch16_224"
        steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
        head = load_file(run / "teacher_head.safetensors")
        assert {tuple(t.shape) for k, t in head.items() if k.startswith("last_layer")} & {(out_dim, 16)}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["out_dim_1024", "out_dim_65536"]
    logs = {arm: (tmp_path / "runs" / arm / "log.jsonl").read_text() for arm in ("out_dim_1024", "out_dim_65536")}
    assert main(args) == 0  # finished: found so, nothing trained again
    assert {arm: (tmp_path / "runs" / arm / "log.jsonl").read_text() for arm in logs} == logs


def run_sweep_script(repo: Path, tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``bash slurm/sweep.sbatch args`` in a stand-in array task: the real ``python`` resolves the arm, and a stand-in
    ``srun`` prints what pretrain.sbatch would launch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text("#!/bin/bash\necho \"srun $*\"\n")
    (bin_dir / "srun").chmod(0o755)
    (bin_dir / "python").write_text(f"#!/bin/bash\nexec {sys.executable} \"$@\"\n")
    (bin_dir / "python").chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "BONY_IMAGE"}
    environment |= {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(repo), "SLURM_JOB_ID": "7",
                    "SLURM_JOB_NODELIST": "node1", "BONY_LAUNCHER": "srun", "PYTHONPATH": str(repo), **env}
    return subprocess.run(["bash", str(repo / "slurm" / "sweep.sbatch"), *args], env=environment, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)


def test_the_array_task_hands_its_arm_to_pretrain_sbatch(repo: Path, tmp_path: Path) -> None:
    sweep = "configs/pretrain/sweeps/single_view.yaml"
    done = run_sweep_script(repo, tmp_path, [str(repo / sweep), str(tmp_path / "runs"), "optim.epochs=2"],
                            SLURM_ARRAY_TASK_ID="1")
    assert done.returncode == 0, done.stderr
    launched = [line for line in done.stdout.splitlines() if line.startswith("srun ")]
    assert launched == [f"srun --kill-on-bad-exit=1 python -m bonylib pretrain --out {tmp_path / 'runs' / 'two_views'} "
                        f"--config {repo / 'configs/pretrain/sweeps/../seed.yaml'} model.backbone=vit_small_patch16_224 "
                        f"optim.epochs=2 crops.global_crops=2 crops.local_crops=0"]


@pytest.mark.parametrize(("env", "needle"), [({}, "not an array job"), ({"SLURM_ARRAY_TASK_ID": "3"}, "no arm 3")])
def test_an_array_task_without_an_arm_is_refused(repo: Path, tmp_path: Path, env: dict[str, str], needle: str) -> None:
    done = run_sweep_script(repo, tmp_path, [str(sweep_file(repo, "single_view")), str(tmp_path / "runs")], **env)
    assert done.returncode == 2 and "srun" not in done.stdout, done.stdout
    one_line(done.stderr.strip().splitlines()[-1], needle)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_script_without_its_arguments_prints_its_usage(repo: Path, tmp_path: Path) -> None:
    done = run_sweep_script(repo, tmp_path, [])
    assert done.returncode == 2 and not done.stdout
    one_line(done.stderr, "usage: sbatch --array=0-N slurm/sweep.sbatch SWEEP OUT")
