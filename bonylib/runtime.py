"""What this machine can run: the device, the precision chosen by the hardware, threads sized to the job.

Machines of one kind differ: one CPU computes bf16 natively (AVX512-BF16 or AMX), another has only
AVX2, where bf16 autocast is emulated and ran 15x slower than fp32. So nothing here assumes the CPU
it was measured on. ``precision: auto`` (every recipe's default) resolves from the hardware and, on a
CPU that claims native bf16, from a short matmul probe; threads and DataLoader workers come from the
CPUs this process may actually use (affinity mask, cgroup quota, SLURM's allocation), not from the
machine's core count. Every decision carries its reason, so a run can record what ran and why.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bonylib.errors import BonyError, ConfigError
from bonylib.files import write_text_atomic

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""CPU flags (as /proc/cpuinfo names them) of instructions that compute bf16 natively: x86's AVX512-BF16
and AMX-BF16, and Arm's BF16 extension."""
BF16_MIN_SPEEDUP = 1.25
"""A CPU with a native-bf16 flag gets bf16 only if the probe's bf16 matmul is at least this much faster than
fp32: autocast adds casts around every op, so a bf16 matmul that is barely faster makes a slower step."""


# ---- the machine -----------------------------------------------------------------------------


def _cpuinfo(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where the file does not exist)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    """The CPU's marketing name (what a reader compares benchmark figures by)."""
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine() or "unknown"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where the OS does not list them."""
    info = _cpuinfo(cpuinfo)
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def cpu_capability() -> str:
    """torch's CPU kernel level (``AVX2``, ``AVX512``, ...): which vectorised kernels torch runs here."""
    return torch.backends.cpu.get_cpu_capability()


def _cgroup_cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup may use (quota / period), or None when unlimited.

    cgroup v2 keeps ``cpu.max`` ("quota period" or "max period") in the process's own group and in
    each ancestor, and the tightest applies; v1 keeps ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``.
    Docker's ``--cpus`` and Kubernetes' limits set these, not the affinity mask.
    """
    limits: list[float] = []
    with contextlib.suppress(OSError):
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, _, path = line.partition(":")[2].partition(":")
            path = path.lstrip("/")
            if hierarchy == "":  # v2: walk from the process's group up to the root
                group = cgroup_root / path
                for folder in (group, *group.parents):
                    if not str(folder).startswith(str(cgroup_root)):
                        break
                    with contextlib.suppress(OSError, ValueError):
                        quota, period = (folder / "cpu.max").read_text().split()[:2]
                        if quota != "max":
                            limits.append(int(quota) / int(period))
            elif "cpu" in hierarchy.split(","):
                for folder in (cgroup_root / hierarchy / path, cgroup_root / "cpu,cpuacct" / path, cgroup_root / "cpu"):
                    with contextlib.suppress(OSError, ValueError):
                        quota_us = int((folder / "cpu.cfs_quota_us").read_text())
                        period_us = int((folder / "cpu.cfs_period_us").read_text())
                        if quota_us > 0:
                            limits.append(quota_us / period_us)
                        break
    return min(limits) if limits else None


def usable_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by the cgroup quota and SLURM's allocation,
    shared among the processes torchrun started on this node (``LOCAL_WORLD_SIZE``)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 1:
        cpus //= int(local)
    return max(1, cpus)


def machine_record() -> dict[str, Any]:
    """Who ran a benchmark or a run: every figure we report names the CPU, torch's kernel level and the GPU."""
    record: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_capability": cpu_capability(),
        "native_bf16_cpu": bool(cpu_flags() & NATIVE_BF16_FLAGS),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return record


def describe_machine(record: dict[str, Any] | None = None) -> str:
    """One line for a benchmark's printout: CPU model, torch's CPU capability, usable CPUs, GPU."""
    r = record or machine_record()
    gpu = f", GPU {r['gpu']}" if r.get("gpu") else ""
    bf16 = "native bf16" if r["native_bf16_cpu"] else "no native bf16"
    return f"{r['cpu_model']} (torch CPU capability {r['cpu_capability']}, {bf16}, {r['usable_cpus']} usable CPUs){gpu}"


# ---- precision -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """The autocast precision a stage runs in, what was asked for, and why this was chosen."""

    name: str
    requested: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self, device: torch.device) -> Any:
        """The autocast context for ``device`` (disabled in fp32)."""
        if self.name == "fp32":
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.dtype)


def _measure_matmul(precision: str, device_type: str, n: int, min_s: float) -> float:
    """FLOP/s of an ``n`` x ``n`` product in ``precision``, the faster of a matmul and a linear layer (see
    :func:`matmul_rate`), each repeated until ``min_s`` has passed."""
    device = torch.device(device_type)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    rates = []
    with Precision(precision, precision, "probe").autocast(device):
        for product in (torch.matmul, torch.nn.functional.linear):
            product(a, b)  # first call: kernel selection, packing buffers
            _sync(device)
            count, start = 0, time.perf_counter()
            while True:
                product(a, b)
                count += 1
                _sync(device)
                elapsed = time.perf_counter() - start
                if elapsed >= min_s:
                    break
            rates.append(2 * n**3 * count / elapsed)
    return max(rates)


@functools.lru_cache(maxsize=None)
def matmul_rate(precision: str, device_type: str = "cpu", n: int = 256, min_s: float = 0.05) -> float:
    """Measured FLOP/s of an ``n`` x ``n`` product as a model computes it in ``precision`` (cached per process).

    fp32 operands under the precision's autocast, as in training, and the faster of the two forms a
    model's layers take, a plain matmul and a linear layer: they dispatch to different kernels (on an
    AVX2 CPU in bf16, 1.3 GFLOP/s for ``a @ b`` against 13 for ``F.linear``), and a limit below what a
    step achieves would print an MFU above 100 %. Short on purpose: each form repeats until ``min_s``
    has passed, so where a call is slow (emulated bf16) a single call is timed.
    """
    return _measure_matmul(precision, device_type, n, min_s)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROBE_ROUNDS = 5
PROBE_FILE = "bf16-probe.json"


def _probe_key() -> str:
    """What the probe's answer depends on: the CPU, its flags and capability, and torch's kernels."""
    return f"{cpu_model()} | {cpu_capability()} | {','.join(sorted(cpu_flags() & NATIVE_BF16_FLAGS))} | torch {torch.__version__}"


def _probe_cache() -> Path:
    return Path(os.environ.get("BONY_CACHE") or Path.home() / ".cache" / "bony") / PROBE_FILE


def bf16_speedup() -> float:
    """The CPU's bf16 matmul rate over its fp32 rate (the probe): above 1 where bf16 is native.

    Measured once per machine and remembered (``$BONY_CACHE/bf16-probe.json``, keyed by the CPU model, flags and
    capability and torch's version), so every stage and chapter of a run resolves ``auto`` alike: a report whose
    two pretraining runs were probed apart once got bf16 for one and fp32 for the other, because another process
    had slowed the second probe, and its comparison of the two was refused. Within the measurement the two
    precisions alternate in :data:`PROBE_ROUNDS` short rounds and each keeps its best: another process on the CPUs
    slows rounds down and never speeds them up, so the best rounds compare the two at the machine's own pace; and it
    runs on one thread, whose speed is the kernel's: on the 2-core AMX machine with a neighbour busy, two threads ran
    a 256-wide bf16 matmul at 2.2 GFLOP/s and fp32 at 2.6 (OpenMP threads waiting on a descheduled peer), one thread
    at 360 and 94: a ratio of 0.86 against the kernels' 3.8.
    """
    cache, key = _probe_cache(), _probe_key()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), (int, float)) and known[key] > 0:
        return float(known[key])
    best = {"bf16": 0.0, "fp32": 0.0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernels' own speed: threads waiting on a descheduled peer measure the neighbours
    try:
        for _ in range(PROBE_ROUNDS):
            for precision in best:
                best[precision] = max(best[precision], _measure_matmul(precision, "cpu", 256, 0.02))
    finally:
        torch.set_num_threads(threads)
    speedup = best["bf16"] / best["fp32"]
    with contextlib.suppress(OSError):  # a read-only home only costs a probe per process
        cache.parent.mkdir(parents=True, exist_ok=True)
        known = known if isinstance(known, dict) else {}
        write_text_atomic(cache, json.dumps({**known, key: speedup}, indent=1) + "\n")
    return speedup


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first GPU if torch sees one, else the CPU; an explicit device must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a torch device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device '{name}': torch sees {torch.cuda.device_count()} GPUs here")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{name}': only cpu and cuda are supported")
    return device


def resolve_precision(requested: str, device: torch.device, flags: frozenset[str] | None = None) -> Precision:
    """The precision a stage runs in on ``device``.

    ``auto``: bf16 on a GPU that computes it natively, else fp16 (with a gradient scaler); on a CPU,
    bf16 only when its flags name a native bf16 instruction set *and* the probe measures bf16 matmuls
    at least :data:`BF16_MIN_SPEEDUP` x fp32, else fp32. An explicit ``bf16`` on a CPU without native
    support runs as asked but warns with the measured slowdown; ``fp16`` needs a GPU.
    """
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got '{requested}'")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        name = torch.cuda.get_device_name(device)
        if requested == "auto":
            choice = "bf16" if native else "fp16"
            return Precision(choice, requested, f"{name} {'computes' if native else 'does not compute'} bf16 natively")
        return Precision(requested, requested, f"asked for, on {name}")
    if requested == "fp16":
        raise ConfigError("precision fp16 needs a GPU (it needs a gradient scaler and is slow on CPUs): use auto or fp32")
    flags = cpu_flags() if flags is None else flags
    native_flags = sorted(flags & NATIVE_BF16_FLAGS)
    capability = cpu_capability()
    if requested == "fp32":
        return Precision("fp32", requested, "asked for")
    if requested == "bf16":
        if not native_flags:
            speedup = bf16_speedup()
            message = (f"precision bf16 on a CPU without native bf16 (torch CPU capability {capability}, no avx512_bf16 "
                       f"or amx_bf16 flag): the probe ran a bf16 matmul at {speedup:.2f}x the fp32 rate, so expect that "
                       f"slowdown; precision auto (or fp32) runs fp32 here")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return Precision("bf16", requested, f"asked for; not native here (bf16 matmul {speedup:.2f}x fp32)")
        return Precision("bf16", requested, f"asked for; native ({', '.join(native_flags)})")
    if not native_flags:
        return Precision("fp32", requested, f"CPU without native bf16 (torch CPU capability {capability}, "
                                            f"no avx512_bf16 / amx_bf16 flag)")
    speedup = bf16_speedup()
    if speedup >= BF16_MIN_SPEEDUP:
        return Precision("bf16", requested, f"native bf16 ({', '.join(native_flags)}); probe: bf16 matmul "
                                            f"{speedup:.2f}x fp32")
    return Precision("fp32", requested, f"the CPU lists {', '.join(native_flags)} but the probe ran a bf16 matmul at "
                                        f"only {speedup:.2f}x fp32 (< {BF16_MIN_SPEEDUP})")


# ---- threads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Threads:
    """How a job's CPUs are split: torch's intra-op threads in the main process and DataLoader workers, and why
    torch got that many (the split, a pinned count, or the other processes found busy on the CPUs)."""

    cpus: int
    torch_threads: int
    workers: int
    reason: str = "the split of the usable CPUs"

    def apply(self) -> None:
        """Set torch's thread count in this process (workers set their own to 1, as torch's DataLoader does)."""
        torch.set_num_threads(self.torch_threads)


class CpuLoad:
    """How many of this process's CPUs other processes keep busy, between two readings: the busy time of the CPUs
    in the affinity mask in ``/proc/stat`` (user, nice, system, irq, softirq, steal), less this process's own and
    its children's (DataLoader workers), per second of wall time. Reads 0 where that cannot be told for this
    process alone: no ``/proc/stat``, or a cgroup quota smaller than the mask (the cores are shared with others by
    time, and their load is not ours to count).

    Why it matters: torch's OpenMP threads meet at a barrier after every op, so a thread that shares its core with
    a busy process makes the others wait for its next time slice at every op. Measured on a 2-core Xeon (AMX) with
    one core kept busy by another job: the demo recipe's XCiT-nano step ran 5.3 images/s on 2 threads and 17.7 on
    one (``python benchmarks/bench_contention.py``)."""

    def __init__(self) -> None:
        self._cpus: set[int] | None = None
        if hasattr(os, "sched_getaffinity") and Path("/proc/stat").is_file():
            mine = os.sched_getaffinity(0)
            quota = _cgroup_cpu_limit()
            self._cpus = mine if quota is None or quota >= len(mine) else None
        self._last = self._read()

    def _read(self) -> tuple[float, float, float]:
        """(busy seconds of the mask's CPUs, CPU seconds of this process and its live children, monotonic time)."""
        if self._cpus is None:
            return 0.0, 0.0, time.monotonic()
        hz = os.sysconf("SC_CLK_TCK")
        ticks = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self._cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                ticks += user + nice + system + irq + softirq + steal
        own = os.times()
        return ticks / hz, own.user + own.system + _children_ticks() / hz, time.monotonic()

    def busy(self) -> float:
        """Other processes' busy CPUs since the last reading (or since this meter was made)."""
        (busy0, own0, start), self._last = self._last, self._read()
        busy1, own1, end = self._last
        return max(0.0, (busy1 - busy0 - (own1 - own0)) / max(end - start, 1e-9))


def _children_ticks() -> int:
    """CPU clock ticks (user + system) of this process's live children, from their ``/proc/<pid>/stat``. The
    children are listed by the kernel (``/proc/self/task/*/children``), so a reading at every logged step costs a
    few small files, not a scan of every process on a busy node; without that list, every process is scanned."""
    listed = list(Path("/proc/self/task").glob("*/children"))
    if listed:
        pids = {pid for path in listed for pid in _read_or_empty(path).split()}
    else:
        pids = {path.parent.name for path in Path("/proc").glob("[0-9]*/stat")}
    me, total = os.getpid(), 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            # the fields after the command name, which may hold spaces
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            if int(fields[1]) == me:
                total += int(fields[11]) + int(fields[12])
    return total


def _read_or_empty(path: Path) -> str:
    """A ``/proc`` file's text, or "" when its thread or process is gone."""
    try:
        return path.read_text()
    except OSError:
        return ""


def busy_cpus(seconds: float = 0.5) -> float:
    """:class:`CpuLoad` over ``seconds`` from now: what a job finds when it starts."""
    meter = CpuLoad()
    time.sleep(seconds)
    return meter.busy()


def plan_threads(workers: int | str = "auto", cpus: int | None = None, gpu: bool = False,
                 busy: float = 0.0) -> Threads:
    """Split ``cpus`` (default: :func:`usable_cpus`) between torch threads and DataLoader workers.

    On a CPU the model and the augmentations share the cores. Augmenting is cheap next to a training
    step (one core makes about 200 demo multi-crop views/s; two cores train about 23 images/s in fp32),
    so one worker needs a fraction of a core and shares one with torch, while every further worker takes
    a core from torch: torch's OpenMP threads wait for each other at every op, so a thread short of a
    core stalls the whole step. ``auto`` is one worker per 8 CPUs (at least one, which overlaps reading
    tiles from slides with the step). Measured on a 2-core AVX2 EPYC, demo recipe in fp32, median of 2
    rounds (benchmarks/bench_threads.py): 2 threads + 0 workers 24.0 images/s, 2 + 1 23.5, 2 + 2 22.1,
    1 + 1 18.1: every split with both cores for torch is within the 10 % noise, and one thread costs a
    quarter. On a GPU the model needs little CPU: all but one CPU go to workers (at most 8), and torch
    keeps what is left. An explicit worker count is kept.

    For the same reason torch takes no core that other processes keep busy (``busy``, from :func:`busy_cpus`):
    a quarter lost when the guess is wrong against a step several times slower when a thread shares its core.
    ``OMP_NUM_THREADS`` in the environment pins torch's count instead (at most the usable CPUs), for runs that
    must repeat bit for bit: a different thread count sums in a different order.
    """
    cpus = usable_cpus() if cpus is None else max(1, cpus)
    if workers == "auto":
        count = min(8, max(1, cpus - 1)) if gpu else max(1, cpus // 8)
    else:
        count = int(workers)
        if count < 0:
            raise ConfigError(f"workers must be 'auto' or at least 0, got {workers}")
    torch_threads = max(1, cpus - count if gpu else cpus - max(0, count - 1))
    pinned = os.environ.get("OMP_NUM_THREADS", "").strip()
    if pinned.isdigit() and int(pinned) > 0:
        return Threads(cpus, min(int(pinned), cpus), count, f"OMP_NUM_THREADS={pinned}")
    free = max(1, round(cpus - busy))
    if free < torch_threads:
        return Threads(cpus, free, count, f"other processes keep {busy:.1f} of the {cpus} CPUs busy")
    return Threads(cpus, torch_threads, count)
