"""``manifest.json`` beside every output: what ran, on what, with which versions, and counts."""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from aligner.data.io import atomic_write_text, join_path, read_text_at

_PACKAGES = ("aesthetic-aligner", "torch", "torchvision", "ray", "open_clip_torch", "faiss-cpu",
             "pyarrow", "numpy", "pillow", "transformers")


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape results (no imports, so it is cheap)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit(repo: str | Path | None = None) -> str | None:
    """The source tree's git commit, or None outside a checkout."""
    try:
        root = Path(repo) if repo else Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, or of every file under a directory (sorted by relative path)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def write_manifest(out_dir: str | Path, job: str, config: dict[str, Any] | None = None,
                   started: float | None = None, **fields: Any) -> dict[str, Any]:
    """Write ``out_dir/manifest.json`` and return what was written.

    Args:
        out_dir: the job's output directory.
        job: the job's name (``embed``, ``pretrain`` ...).
        config: the resolved config, as plain data.
        started: ``time.time()`` at the job's start; gives ``wall_time_s``.
        **fields: inputs, counts, outputs and anything else the job reports.
    """
    now = time.time()
    manifest: dict[str, Any] = {
        "job": job,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "host": socket.gethostname(),
        "git_commit": git_commit(),
        "versions": versions(),
    }
    if started is not None:
        manifest["wall_time_s"] = round(now - started, 3)
    if config is not None:
        manifest["config"] = config
    manifest.update(fields)
    atomic_write_text(Path(out_dir) / "manifest.json", json.dumps(manifest, indent=2, default=str))
    return manifest


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """Read ``out_dir/manifest.json``; ``out_dir`` is a local directory or an ``s3://`` /
    ``gs://`` prefix (FileNotFoundError with the path if it is missing)."""
    text = read_text_at(join_path(out_dir, "manifest.json"))
    if text is None:
        raise FileNotFoundError(f"no manifest.json in {out_dir}: is this a finished job output?")
    return json.loads(text)
