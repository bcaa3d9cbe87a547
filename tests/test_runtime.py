"""The machine's settings: precision from the hardware (probe stubbed), CPUs from affinity, cgroup and SLURM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from bonylib import runtime
from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config
from bonylib.errors import ConfigError
from bonylib.runtime import Precision, cpu_flags, plan_threads, resolve_precision

CPU = torch.device("cpu")


def no_probe() -> float:
    raise AssertionError("the bf16 probe must not run here")


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch):
    """Set what the bf16 matmul probe measures (bf16 rate / fp32 rate)."""
    def set_speedup(speedup: float | None) -> None:
        monkeypatch.setattr(runtime, "bf16_speedup", no_probe if speedup is None else lambda: speedup)
    return set_speedup


@pytest.mark.parametrize(("flags", "speedup", "expected"), [
    (frozenset({"avx2", "fma"}), None, "fp32"),                    # AVX2 only: fp32, no probe needed
    (frozenset({"avx512f", "avx512bw"}), None, "fp32"),            # AVX-512 without BF16: still emulated
    (frozenset({"avx512f", "avx512_bf16"}), 2.6, "bf16"),          # Cooper Lake / Zen 4
    (frozenset({"amx_bf16", "amx_tile", "avx512_bf16"}), 9.0, "bf16"),  # Sapphire Rapids
    (frozenset({"avx512_bf16"}), 1.1, "fp32"),                     # listed, but the probe finds it slow
    (frozenset({"bf16", "asimd"}), 1.9, "bf16"),                   # Arm with the BF16 extension
])
def test_auto_resolves_from_the_cpu_flags_and_the_probe(flags, speedup, expected, probe) -> None:
    probe(speedup)
    chosen = resolve_precision("auto", CPU, flags=flags)
    assert chosen.name == expected and chosen.requested == "auto"
    assert chosen.reason  # says why, for the run's record


def test_explicit_bf16_without_native_support_warns_with_the_measured_slowdown(probe) -> None:
    probe(0.07)
    with pytest.warns(RuntimeWarning, match=r"0\.07x the fp32 rate"):
        chosen = resolve_precision("bf16", CPU, flags=frozenset({"avx2"}))
    assert chosen.name == "bf16"  # runs as asked


def test_explicit_precisions_are_kept_and_bad_ones_refused(probe) -> None:
    probe(None)
    assert resolve_precision("fp32", CPU, flags=frozenset({"amx_bf16"})).name == "fp32"
    assert resolve_precision("bf16", CPU, flags=frozenset({"amx_bf16"})).name == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision("bfloat16", CPU)


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu(native: bool, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = {}
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        asked["emulation"] = including_emulation
        return native
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100" if not native else "H100")
    assert resolve_precision("auto", torch.device("cuda:0")).name == expected
    assert asked["emulation"] is False  # emulated bf16 is what made the CPU 15x slower


def test_the_probe_measures_both_precisions_quickly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BONY_CACHE", str(tmp_path))
    runtime.matmul_rate.cache_clear()
    assert runtime.matmul_rate("fp32", n=64, min_s=0.01) > 1e6
    assert runtime.bf16_speedup() > 0


def test_the_probe_is_measured_once_per_machine_and_at_its_best_rounds(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """A busy neighbour slowed one process's probe and flipped ``auto`` between two runs of one report: the probe
    keeps each precision's best round and is remembered per machine (CPU, flags, torch) for every later process."""
    monkeypatch.setenv("BONY_CACHE", str(tmp_path))
    rounds = {"bf16": iter([1.0, 9.0, 2.0, 2.0, 2.0]), "fp32": iter([3.0, 1.0, 6.0, 1.0, 1.0])}  # slowed rounds
    monkeypatch.setattr(runtime, "_measure_matmul", lambda precision, *args: next(rounds[precision]))
    assert runtime.bf16_speedup() == 9.0 / 6.0
    monkeypatch.setattr(runtime, "_measure_matmul", lambda precision, *args: 1.0 if precision == "bf16" else 8.0)
    assert runtime.bf16_speedup() == 1.5, "remembered: a later, busier probe does not flip the decision"
    assert json.loads((tmp_path / runtime.PROBE_FILE).read_text()) == {runtime._probe_key(): 1.5}
    monkeypatch.setattr(runtime, "_probe_key", lambda: "another CPU")
    assert runtime.bf16_speedup() == 1 / 8
    (tmp_path / runtime.PROBE_FILE).write_text("{not json")
    assert runtime.bf16_speedup() == 1 / 8, "a damaged record is measured again"


def test_precision_autocast_runs_in_its_dtype() -> None:
    a = torch.randn(8, 8)
    with Precision("bf16", "auto", "test").autocast(CPU):
        assert (a @ a).dtype == torch.bfloat16
    with Precision("fp32", "auto", "test").autocast(CPU):
        assert (a @ a).dtype == torch.float32


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: other\n")
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()


# ---- CPUs and threads ------------------------------------------------------------------------


def test_usable_cpus_follow_the_affinity_mask() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to restrict the mask to 1")
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from bonylib.runtime import usable_cpus, plan_threads; p = plan_threads(); "
            "print(usable_cpus(), p.torch_threads, p.workers)")
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["1", "1", "1"]


def test_usable_cpus_follow_slurm_and_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setattr(runtime, "_cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "12")
    assert runtime.usable_cpus() == 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's 4 processes share the task's 12 CPUs
    assert runtime.usable_cpus() == 3
    monkeypatch.setattr(runtime, "_cgroup_cpu_limit", lambda: 2.5)  # a container quota below both
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert runtime.usable_cpus() == 2


def test_cgroup_quota_v2_takes_the_tightest_ancestor(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "jobs" / "job1").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "jobs" / "cpu.max").write_text("400000 100000\n")
    (root / "jobs" / "job1" / "cpu.max").write_text("150000 100000\n")
    proc = tmp_path / "self_cgroup"
    proc.write_text("0::/jobs/job1\n")
    assert runtime._cgroup_cpu_limit(root, proc) == 1.5
    (root / "jobs" / "job1" / "cpu.max").write_text("max 100000\n")
    assert runtime._cgroup_cpu_limit(root, proc) == 4.0


def test_cgroup_quota_v1(tmp_path: Path) -> None:
    folder = tmp_path / "cgroup" / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("300000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "self_cgroup"
    proc.write_text("4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    assert runtime._cgroup_cpu_limit(tmp_path / "cgroup", proc) == 3.0
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert runtime._cgroup_cpu_limit(tmp_path / "cgroup", proc) is None


@pytest.mark.parametrize(("cpus", "workers", "gpu", "threads", "expected_workers"), [
    (2, "auto", False, 2, 1),    # the measured best on 2 cores: the one worker shares a core
    (2, 2, False, 1, 2),         # a second worker takes a core from torch
    (2, 0, False, 2, 0),
    (1, "auto", False, 1, 1),
    (16, "auto", False, 15, 2),
    (16, "auto", True, 8, 8),    # GPU: the CPUs feed the GPU
    (3, "auto", True, 1, 2),
])
def test_thread_plan(cpus, workers, gpu, threads, expected_workers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = plan_threads(workers, cpus=cpus, gpu=gpu)
    assert (plan.torch_threads, plan.workers, plan.cpus) == (threads, expected_workers, cpus)
    assert plan.torch_threads + max(0, plan.workers - 1) <= cpus or plan.torch_threads == 1


@pytest.mark.parametrize(("cpus", "busy", "threads"), [
    (2, 0.0, 2), (2, 0.4, 2),    # a core mostly free is a core
    (2, 0.6, 1), (2, 1.0, 1),    # one of two taken: one thread
    (2, 2.5, 1),                 # never fewer than one
    (16, 3.2, 13),               # the split's 15 less the 3 cores others hold
    (16, 0.0, 15),
])
def test_torch_takes_no_core_others_keep_busy(cpus, busy, threads, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = plan_threads("auto", cpus=cpus, busy=busy)
    assert plan.torch_threads == threads
    assert ("busy" in plan.reason) == (threads < plan_threads("auto", cpus=cpus).torch_threads)


def test_omp_num_threads_pins_the_count_whatever_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    plan = plan_threads("auto", cpus=16, busy=10.0)
    assert (plan.torch_threads, plan.reason) == (2, "OMP_NUM_THREADS=2")
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert plan_threads("auto", cpus=16).torch_threads == 16   # at most the usable CPUs


SPIN = "import time\nend = time.time() + 30\nwhile time.time() < end: pass"
"""A process keeping one CPU busy for at most 30 s."""


def test_cpu_load_counts_other_processes_not_this_one_or_its_children() -> None:
    """A spinning process that is not ours (a grandchild, through bash) counts; other load on the machine can only
    add to it. This process spinning in a thread and a child of it spinning (as a DataLoader worker would) do not:
    another process measuring the same window counts both, this one neither (the machine's other load in both)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    competitor = subprocess.Popen(["bash", "-c", f'"{sys.executable}" -c "$0"; true', SPIN], start_new_session=True)
    try:
        time.sleep(0.5)
        assert runtime.busy_cpus(1.0) >= 0.6
    finally:
        os.killpg(competitor.pid, signal.SIGKILL)
        competitor.wait()
    probe = subprocess.Popen([sys.executable, "-c", "from bonylib import runtime\nprint('ready', flush=True)\n"
                              "print(runtime.busy_cpus(2.0), flush=True)"], stdout=subprocess.PIPE, text=True)
    assert probe.stdout.readline().strip() == "ready"
    child = subprocess.Popen([sys.executable, "-c", SPIN])
    stop = threading.Event()
    worker = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])
    worker.start()
    try:
        own = runtime.busy_cpus(2.0)
    finally:
        stop.set()
        worker.join()
        child.kill()
        child.wait()
    outside = float(probe.stdout.readline())
    probe.wait()
    assert outside - own >= 0.6, (outside, own)


def test_the_trainer_follows_the_load(repo: Path, smoke_data: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A competitor arriving mid-run takes a thread from torch at the next logged step, and leaving gives it back;
    the meter is scripted here (its readings are tested above)."""
    from bonylib.ssl import trainer as trainer_module

    readings = iter([0.0, 1.0, 1.0, 0.0, 0.0])

    class Scripted:
        def busy(self) -> float:
            return next(readings, 0.0)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer_module, "busy_cpus", lambda seconds=0.5: 0.0)
    monkeypatch.setattr(trainer_module, "CpuLoad", Scripted)
    threads = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(trainer_module.Trainer, "_log", lambda self, *args: seen.append(torch.get_num_threads()))
    cfg = load_config(PretrainConfig, repo / "configs" / "pretrain" / "smoke.yaml",
                      [f"data.images={smoke_data / 'deepgleason' / 'tiles'}", "max_steps=5", "log_every=1",
                       "data.workers=0"])
    try:
        with caplog.at_level("INFO", logger="bonylib.ssl.trainer"):
            build_trainer(cfg, tmp_path / "run").train()
    finally:
        torch.set_num_threads(threads)
    assert seen == [2, 2, 1, 1, 2]   # threads in use when each step was logged; the load read after it
    changes = [r.getMessage() for r in caplog.records if "torch threads 2 -> 1" in r.getMessage()
               or "torch threads 1 -> 2" in r.getMessage()]
    assert len(changes) == 2 and "busy" in changes[0]


# ---- the trainer runs and records what was resolved ------------------------------------------


@pytest.mark.parametrize(("flags", "expected"), [(frozenset({"amx_bf16"}), "bf16"), (frozenset({"avx2"}), "fp32")])
def test_trainer_runs_and_records_the_resolved_precision(flags, expected, repo: Path, smoke_data: Path, tmp_path: Path,
                                                        probe, monkeypatch: pytest.MonkeyPatch) -> None:
    probe(3.0 if expected == "bf16" else None)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU's decision, also on a GPU machine
    cfg = load_config(PretrainConfig, repo / "configs" / "pretrain" / "smoke.yaml",
                      [f"data.images={smoke_data / 'deepgleason' / 'tiles'}", "optim.precision=auto", "max_steps=1",
                       "data.workers=auto"])
    trainer = build_trainer(cfg, tmp_path / "run")
    seen = []
    trainer.model.student_network.backbone.blocks[0].attn.qkv.register_forward_hook(  # a matmul: its dtype is autocast's
        lambda module, inputs, output: seen.append(output.dtype))
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16 if expected == "bf16" else torch.float32}
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optim"]["precision"] == expected
    assert saved["data"]["workers"] == trainer.threads.workers >= 1
    record = json.loads((tmp_path / "run" / "runtime.json").read_text())
    assert record["precision"]["name"] == expected and record["precision"]["requested"] == "auto"
    assert record["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["threads"]["torch_threads"] == torch.get_num_threads()


def test_recipes_default_to_auto(repo: Path) -> None:
    for recipe in ("demo", "cluster"):
        cfg = load_config(PretrainConfig, repo / "configs" / "pretrain" / f"{recipe}.yaml")
        assert cfg.optim.precision == "auto" and cfg.data.workers == "auto", recipe
    # the seed's experiment runs DINO's default mixed precision, fp16 with a gradient scaler (tests/test_profiles.py)
    assert load_config(PretrainConfig, repo / "configs" / "pretrain" / "seed.yaml").data.workers == "auto"
    with pytest.raises(ConfigError, match="data.workers"):
        load_config(PretrainConfig, None, ["data.workers=-2"])
