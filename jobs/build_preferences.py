"""Build the preference pairs that ranked DPO trains on (teacher grid + degraded copies + extras).

    python -m jobs.build_preferences --config jobs/configs/build_preferences.yaml \\
        embeddings=out/embeddings queries=out/rephrased output=out/preferences

Its inputs (``embeddings``, ``index``, ``queries``, ``corpus``, ``extra_tables``) may be
``s3://`` / ``gs://`` URIs as well as local paths (``reward_model`` stays a local checkpoint);
``output`` is a local directory, or a URI the files are uploaded to at the end (manifest
last). A missing input or bucket exits 2 with its name. The work is
:func:`aligner.preferences.build.build_preferences`; ``--help`` lists every field.
"""

from __future__ import annotations

from pathlib import Path

from aligner.data.io import join_path
from aligner.data.preferences import PREFERENCES_FILE
from aligner.preferences.build import BuildPreferencesConfig, build_preferences
from aligner.runtime.job import job_main

DEFAULT_YAML = Path(__file__).parent / "configs" / "build_preferences.yaml"


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.build_preferences [--config FILE] [key=value ...]``; the exit code."""
    return job_main(BuildPreferencesConfig, argv, DEFAULT_YAML, build_preferences,
                    lambda cfg, counts: f"build_preferences: {counts['pairs']} pairs for "
                    f"{counts['queries']} queries {counts['by_source']} -> "
                    f"{join_path(cfg.output, PREFERENCES_FILE)}", "python -m jobs.build_preferences")


if __name__ == "__main__":
    raise SystemExit(main())
