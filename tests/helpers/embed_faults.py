"""Real faults for the embedding job's tests: an aesthetic scorer that kills its own process.

:class:`DieOnceScorer` is loaded by the model actors by import path
(``scorer=tests.helpers.embed_faults:DieOnceScorer``). While :func:`arm` has left a marker for this
Ray node, the first actor that reaches its second batch claims the marker (an atomic rename,
so exactly one process wins) and exits with ``os._exit`` - no exception, no clean-up, as a
crashed or OOM-killed worker would. Its replacement finds no marker and scores normally.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

from aligner.aesthetics.scorer import AestheticScorer

SCORER = "tests.helpers.embed_faults:DieOnceScorer"


def marker_dir() -> Path:
    """One directory per Ray node (the driver and its actors share it; sessions do not)."""
    import ray

    return Path(tempfile.gettempdir()) / "aligner-faults" / ray.get_runtime_context().get_node_id()


def arm() -> Path:
    """Arm the fault; returns the file that exists once it has fired."""
    d = marker_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "fired").unlink(missing_ok=True)
    (d / "armed").write_text("")
    return d / "fired"


def disarm() -> None:
    d = marker_dir()
    for name in ("armed", "fired"):
        (d / name).unlink(missing_ok=True)


class DieOnceScorer(AestheticScorer):
    """An embedding scorer (``10 * embedding[:, 0]``) that kills its process once, when armed."""

    name = "die-once"
    needs = "embedding"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, batch):
        self.calls += 1
        if self.calls == 2:
            d = marker_dir()
            try:
                os.rename(d / "armed", d / "fired")
            except FileNotFoundError:
                pass  # not armed, or another process already died
            else:
                (d / "fired").write_text(f"pid {os.getpid()}")
                os._exit(1)
        return np.asarray(batch, np.float32)[:, 0] * 10


def png(rng: np.random.Generator, size: int = 32) -> bytes:
    """A small random-coloured PNG."""
    from PIL import Image

    im = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()
