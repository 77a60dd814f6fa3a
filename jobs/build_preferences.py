"""Build the preference pairs that ranked DPO trains on (teacher grid + degraded copies + extras).

    python -m jobs.build_preferences --config jobs/configs/build_preferences.yaml \\
        embeddings=out/embeddings queries=out/rephrased output=out/preferences

The work is :func:`aligner.preferences.build.build_preferences`; ``--help`` lists every field.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aligner.data.preferences import PREFERENCES_FILE
from aligner.preferences.build import BuildPreferencesConfig, build_preferences
from aligner.runtime.config import dump_yaml, load_config
from aligner.runtime.logs import setup_logging

log = logging.getLogger("jobs.build_preferences")
DEFAULT_YAML = Path(__file__).parent / "configs" / "build_preferences.yaml"


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.build_preferences [--config FILE] [key=value ...]``; the exit code."""
    setup_logging()
    cfg = load_config(BuildPreferencesConfig, argv, DEFAULT_YAML,
                      prog="python -m jobs.build_preferences")
    log.info("config:\n%s", dump_yaml(cfg))
    try:
        counts = build_preferences(cfg)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    print(f"build_preferences: {counts['pairs']} pairs for {counts['queries']} queries "
          f"{counts['by_source']} -> {Path(cfg.output) / PREFERENCES_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
