"""Votes -> a preferences table (``preferences.parquet`` + ``manifest.json``) for training.

    python -m serving.votes.export database=sqlite:////abs/votes.db output=out/votes
    python -m jobs.build_preferences ... extra_tables=[out/votes]

Rules, for each vote with ``confidence >= min_confidence`` (oldest vote first):

- A vote for a row turns into image pairs between the comparison's two rows, rank by rank:
  at each rank ``r`` the preferred row's image at ``r`` is chosen over the other row's image
  at ``r`` (``chosen_id`` / ``rejected_id``), when the two ids differ and neither id appears
  in both rows (an image both models returned says nothing about which model is better).
  Ranks past the end of the shorter row pair with nothing and are skipped.
- ``query_id`` and ``query`` are the comparison's (``query_id`` is stable per query text,
  :func:`serving.votes.models.query_id_for`); ``source`` is ``"human"``;
  ``weight = confidence / 5``; ``teacher`` is ``"human"``; other diagnostics are empty.
- A tie produces no pairs.
- Several votes on the same comparison each contribute their own pairs (repeated pairs are
  kept; the preference builder's clean-up dedupes and resolves contradictions).

The table is written with :func:`aligner.data.preferences.write_preferences`, so it has the
preferences schema and passes :func:`aligner.data.preferences.read_preferences`; it can be
given to the preference builder as one of its ``extra_tables``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.data.preferences import PREFERENCES_FILE, rows_to_table, write_preferences
from aligner.runtime.job import job_main
from aligner.runtime.manifest import write_manifest
from serving.votes.models import MAX_CONFIDENCE, MIN_CONFIDENCE
from serving.votes.store import VoteStore

log = logging.getLogger("serving.votes")

SOURCE = "human"
#: environment variable read when no database URL is given on the command line
URL_ENV = "VOTES_DB_URL"


def vote_pairs(left_ids: Sequence[str], right_ids: Sequence[str],
               preferred: str) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """The (chosen, rejected) image pairs of one vote, and how many ranks were skipped.

    Returns:
        ``(pairs, skipped)`` with ``skipped = {"same_id": n, "shared_id": n, "unpaired": n}``
        (ranks where both rows hold the same image, where an image is in both rows, and
        ranks past the shorter row). A tie returns no pairs and no skips.
    """
    skipped = {"same_id": 0, "shared_id": 0, "unpaired": 0}
    if preferred == "tie":
        return [], skipped
    if preferred not in ("left", "right"):
        raise ValueError(f"preferred must be 'left', 'right' or 'tie', got {preferred!r}")
    win, lose = (left_ids, right_ids) if preferred == "left" else (right_ids, left_ids)
    win_set, lose_set = set(win), set(lose)
    pairs = []
    for a, b in zip(win, lose, strict=False):
        if a == b:
            skipped["same_id"] += 1
        elif a in lose_set or b in win_set:
            skipped["shared_id"] += 1
        else:
            pairs.append((a, b))
    skipped["unpaired"] = abs(len(win) - len(lose))
    return pairs, skipped


def export_preferences(store_or_url: VoteStore | str | Path, out_dir: str | Path,
                       min_confidence: int = MIN_CONFIDENCE) -> dict[str, Any]:
    """Write the votes as ``out_dir/preferences.parquet`` (rules: the module docstring) and a
    ``manifest.json`` beside it; returns the counts.

    Args:
        store_or_url: an open :class:`VoteStore` (left open), or a URL / SQLite path to open
            (and close) one on; opening migrates the database to head.
        out_dir: output directory (created).
        min_confidence: votes below this confidence are left out.

    Returns:
        ``{"comparisons", "comparisons_voted", "votes", "votes_below_min_confidence",
        "tie_votes", "pairs", "queries", "skipped": {"same_id", "shared_id", "unpaired"}}``:
        comparisons in the database, comparisons with an exported vote, votes exported
        (ties included), votes left out, ties, pairs written, distinct queries with pairs,
        ranks that gave no pair.

    Raises:
        ValueError: ``min_confidence`` outside 1..5.
    """
    if (not isinstance(min_confidence, int) or isinstance(min_confidence, bool)
            or not MIN_CONFIDENCE <= min_confidence <= MAX_CONFIDENCE):
        raise ValueError(f"min_confidence must be an integer from {MIN_CONFIDENCE} to "
                         f"{MAX_CONFIDENCE}, got {min_confidence!r}")
    started = time.time()
    own = not isinstance(store_or_url, VoteStore)
    store = VoteStore(store_or_url) if own else store_or_url
    assert isinstance(store, VoteStore)
    try:
        db_counts = store.counts()
        records = store.vote_records(min_confidence)
        database = repr(store)
    finally:
        if own:
            store.close()

    rows: list[dict[str, Any]] = []
    skipped = {"same_id": 0, "shared_id": 0, "unpaired": 0}
    ties = 0
    for r in records:
        c = r["comparison"]
        ties += r["preferred"] == "tie"
        pairs, skip = vote_pairs(c["left_ids"], c["right_ids"], r["preferred"])
        for k, n in skip.items():
            skipped[k] += n
        weight = r["confidence"] / MAX_CONFIDENCE
        rows += [{"query_id": c["query_id"], "query": c["query"], "chosen_id": a,
                  "rejected_id": b, "source": SOURCE, "weight": weight, "teacher": SOURCE}
                 for a, b in pairs]

    out = Path(out_dir)
    path = write_preferences(rows_to_table(rows), out)
    counts = {"comparisons": db_counts["comparisons"],
              "comparisons_voted": len({r["comparison_id"] for r in records}),
              "votes": len(records),
              "votes_below_min_confidence": db_counts["votes"] - len(records),
              "tie_votes": ties, "pairs": len(rows),
              "queries": len({r["query_id"] for r in rows}), "skipped": skipped}
    write_manifest(out, "export_votes", config={"min_confidence": min_confidence},
                   started=started, inputs={"database": database}, counts=counts,
                   winners=db_counts["by_model"], outputs={"preferences": str(path)})
    log.info("export_votes: %d votes (%d ties) -> %d pairs in %s", len(records), ties,
             len(rows), path)
    return counts


@dataclass
class ExportVotesConfig:
    """Export the votes database as a preferences table (source human)."""

    database: str = field(default="", metadata={
        "help": f"SQLAlchemy URL or SQLite path of the votes; '' = ${URL_ENV}"})
    output: str = field(default="out/votes", metadata={"help": "output directory"})
    min_confidence: int = field(default=MIN_CONFIDENCE, metadata={
        "help": "leave out votes below this confidence (1..5)"})

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("output is required")


def run_export(cfg: ExportVotesConfig) -> dict[str, Any]:
    """:func:`export_preferences` for a config (the database URL from the environment if unset).

    Raises:
        ValueError: no database given and ``$VOTES_DB_URL`` unset.
        FileNotFoundError: an SQLite path whose file does not exist.
    """
    url = cfg.database or os.environ.get(URL_ENV, "")
    if not url:
        raise ValueError(f"no votes database: pass database=URL or set ${URL_ENV}")
    if "://" not in url and not Path(url).is_file():
        raise FileNotFoundError(f"votes database {url} does not exist")
    return export_preferences(url, cfg.output, cfg.min_confidence)


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.votes.export [database=URL] [output=DIR] [min_confidence=N]``."""
    return job_main(ExportVotesConfig, argv, None, run_export,
                    lambda cfg, c: f"export_votes: {c['votes']} votes ({c['tie_votes']} ties) "
                    f"-> {c['pairs']} pairs -> {Path(cfg.output) / PREFERENCES_FILE}",
                    "python -m serving.votes.export")


if __name__ == "__main__":
    raise SystemExit(main())
