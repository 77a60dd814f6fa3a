"""What ran the benchmarks: CPUs, memory, library versions, GPU, date and git commit.

Every field is read from the machine at run time; a library that is not installed is recorded
as ``None`` rather than guessed.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "faiss-cpu", "faiss-gpu", "ray", "open_clip_torch", "numpy", "pyarrow")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_info() -> dict[str, Any]:
    """``{"cuda": bool, "name": str | None, "count": int}`` from torch (no GPU: cuda False)."""
    try:
        import torch
    except ImportError:
        return {"cuda": False, "name": None, "count": 0}
    if not torch.cuda.is_available():
        return {"cuda": False, "name": None, "count": 0}
    return {"cuda": True, "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count()}


def machine_info() -> dict[str, Any]:
    """The machine and software the benchmark ran on (all read now, nothing assumed)."""
    import psutil

    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "ram_available_gb": round(psutil.virtual_memory().available / 2**30, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "gpu": gpu_info(),
        "versions": {p: _version(p) for p in PACKAGES},
        "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(dirty) if dirty is not None
                else None},
    }
