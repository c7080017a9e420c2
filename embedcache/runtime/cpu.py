"""The CPU work runs on: its identity (what a measurement on it holds for) and the cores this process may use
(its affinity mask, capped by a cgroup quota and by ``OMP_NUM_THREADS``). The CPU engines
(:mod:`embedcache.model.engines`) size their threads by :func:`cpu_threads` and key their measurements by
:func:`cpu_identity`; the benchmarks name the machine with them."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path


def cpu_threads() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup CPU quota (a container's
    ``--cpus``) where one is set, and by ``OMP_NUM_THREADS`` where that is a positive whole number, for the
    engines' intra-op threads. torch's own threads follow ``OMP_NUM_THREADS`` too, so a job started beside another
    with ``OMP_NUM_THREADS=1`` keeps to one core whichever engine runs it (ONNX Runtime's and OpenVINO's threads
    would otherwise take every core, and ONNX Runtime's spin while they wait)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    cores = max(1, min(cores, quota)) if quota else cores
    asked = os.environ.get("OMP_NUM_THREADS", "").strip()
    return min(cores, int(asked)) if asked.isdigit() and int(asked) > 0 else cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPUs a cgroup quota allows (rounded up), from cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``;
    None where there is no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _cpuinfo(text: str | None = None) -> dict[str, str]:
    """Linux ``/proc/cpuinfo`` (or ``text``) as its first value of each field: the first processor's, every core
    of one machine being alike; empty where there is none."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what :mod:`platform` says."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


#: The instruction sets that change which engine and precision run fastest (and whether bf16 runs at all).
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_identity(cpuinfo: str | None = None) -> str:
    """The CPU as a measurement is valid for: its model name, family and model numbers, and which of
    :data:`CPU_FEATURES` it has (Linux ``/proc/cpuinfo``, or the text given). The name alone is not enough: an
    "AMD EPYC" of a cloud machine was an AVX2 CPU without bf16 one day and an AVX-512 one with bf16 the next, and a
    home folder shared by a cluster's nodes would have answered one with the other's measurement."""
    fields = _cpuinfo(cpuinfo)
    if not fields:
        return cpu_name()
    flags = set(fields.get("flags", "").split())
    features = ",".join(f for f in CPU_FEATURES if f in flags)
    return (f"{fields.get('model name') or cpu_name()} (family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}; {features or 'none of ' + ','.join(CPU_FEATURES)})")
