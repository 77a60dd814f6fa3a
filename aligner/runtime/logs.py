"""Logging set-up shared by the jobs: one format, INFO by default, quiet third parties."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once (``ALIGNER_LOG_LEVEL`` overrides the level)."""
    level = level or os.environ.get("ALIGNER_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("urllib3", "filelock", "fsspec", "PIL", "matplotlib", "httpx", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
