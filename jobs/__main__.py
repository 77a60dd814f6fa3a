"""``python -m jobs``: list the jobs; ``python -m jobs --configs-doc`` rewrites docs/configs.md.

docs/configs.md is generated from the config dataclasses (the one home of every default), so it
cannot drift from them; a unit test checks it is current.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from aligner.runtime.config import markdown_reference

#: job module -> its config class (in pipeline order)
JOBS = {"make_world": "MakeWorldConfig", "pretrain": "PretrainConfig", "embed": "EmbedConfig",
        "build_index": "IndexConfig", "search": "SearchConfig", "rephrase": "RephraseConfig",
        "build_preferences": "BuildPreferencesConfig", "align": "AlignConfig",
        "rater_votes": "RaterVotesConfig", "train_reward": "TrainRewardConfig",
        "annotate": "AnnotateConfig", "evaluate": "EvaluateConfig", "judge": "JudgeConfig",
        "quickstart": "QuickstartConfig", "study": "StudyConfig", "loop": "LoopConfig",
        "learning_curve": "LearningCurveConfig"}
DOC = Path(__file__).resolve().parent.parent / "docs" / "configs.md"


def configs_doc() -> str:
    """docs/configs.md: every job's fields with type, default and help."""
    parts = ["# Job configs: every field, its type, default and help", "",
             "Generated from the config dataclasses by `python -m jobs --configs-doc`; do not "
             "edit by hand. Override any field on the command line with `key=value` (nested "
             "fields as `a.b=value`, lists as `[x,y]`), or put it in a YAML file passed with "
             "`--config`. Why the defaults are what they are: `docs/defaults.md`.", ""]
    for job, cls_name in JOBS.items():
        mod = importlib.import_module(f"jobs.{job}")
        parts.append(markdown_reference(getattr(mod, cls_name), f"`jobs.{job}`",
                                        f"python -m jobs.{job} key=value ..."))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--configs-doc"]:
        DOC.write_text(configs_doc())
        print(f"wrote {DOC}")
        return 0
    for job in JOBS:
        doc = (importlib.import_module(f"jobs.{job}").__doc__ or "").strip().splitlines()[0]
        print(f"python -m jobs.{job:<18} {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
