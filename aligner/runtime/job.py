"""The shape every job's entry point shares: parse, log, run, report (``main(argv) -> int``).

    def main(argv: list[str] | None = None) -> int:
        return job_main(EmbedConfig, argv, DEFAULT_YAML, run_embed, _done, "python -m jobs.embed")

Bad input (a missing file, a wrong schema, a bad value) is logged as one clear line and the
exit code is 2; a config that does not parse exits 2 with the field named (argparse / the
config loader); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aligner.runtime.config import ConfigError, dump_yaml, load_config
from aligner.runtime.logs import setup_logging

T = TypeVar("T")
log = logging.getLogger("aligner.job")
#: what a job reports as bad input rather than as a crash
INPUT_ERRORS = (FileNotFoundError, ValueError, KeyError, ConnectionError)


def job_main(cls: type[T], argv: list[str] | None, default_yaml: str | Path | None,
             run: Callable[[T], Any], report: Callable[[T, Any], str], prog: str) -> int:
    """Load ``cls`` from ``[--config FILE] key=value ...``, log it, ``run`` it, print
    ``report(cfg, result)``; returns the exit code (0, or 2 on bad input)."""
    setup_logging()
    try:
        cfg = load_config(cls, argv, default_yaml, prog=prog)
    except ConfigError as e:
        log.error("%s: ConfigError: %s", prog, e)
        return 2
    log.info("config:\n%s", dump_yaml(cfg))
    try:
        result = run(cfg)
    except INPUT_ERRORS as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2
    print(report(cfg, result))
    return 0
