"""What votes buy: the primary measure against the number of votes, per teacher
(``jobs.learning_curve``, docs/learning_curve.md).

On a prepared built-in world (a ``jobs.quickstart`` workdir: the world, the base, its
embeddings, the rephrased queries and the label-free teacher's preferences), for each seed:

1. the world's simulated people (:class:`aligner.world.raters.RaterPopulation`) vote on a pool
   of image pairs drawn from the training and validation splits (never a test or gallery
   image), in a seeded order; the first ``n`` votes are the votes "so far" at count ``n``, so
   the counts are nested;
2. at each count a reward model is fitted on those votes and the retriever re-aligned from
   the base with the reward teacher alone and with the mix (label-free + reward)
   (:mod:`aligner.feedback.retrain`, the same path ``jobs.loop`` takes); the label-free teacher
   needs no votes and is aligned once per seed;
3. every model is scored by the evaluation's primary measure, nDCG@10 with gain match x beauty
   on the dense held-out test gallery (:func:`aligner.evaluation.checkpoint.primary_metrics`),
   per query.

Levels and differences are pooled over seeds: per query, the values of every seed; CIs
resample queries (a cluster bootstrap). At 0 votes the reward and mix teachers are the
label-free one (there is nothing to learn a reward from). Every point is a directory with its
``metrics.json``; a rerun skips the points that are done.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from aligner.feedback.retrain import RetrainSettings
from aligner.world.raters import RaterSettings

log = logging.getLogger(__name__)

TEACHERS = ("label_free", "reward", "mix")
METRIC = "ndcg@10"
MEASURES = ("ndcg@10", "beauty_relevant@10", "precision@10")


def _default_raters() -> RaterSettings:
    return RaterSettings(pairs_per_query=100)


def _default_retrain() -> RetrainSettings:
    return RetrainSettings(reward_kind="head")


@dataclass
class CurveConfig:
    """The learning curve of one prepared world (docs/learning_curve.md)."""

    prepared: str = field(default="out", metadata={
        "help": "a jobs.quickstart workdir: world/, base/checkpoint, embeddings/, rephrased/, "
                "preferences/<label-free teacher>/"})
    output: str = field(default="out/learning_curve", metadata={"help": "output directory"})
    name: str = field(default="", metadata={"help": "the world's name in reports (default: "
                                                    "the prepared directory's name)"})
    counts: list[int] = field(default_factory=lambda: [0, 500, 2000, 8000, 32000], metadata={
        "help": "vote counts (nested: the first n votes of one seeded order)"})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={
        "help": "seeds: the votes drawn, the raters' noise, every trainer's seed"})
    teachers: list[str] = field(default_factory=lambda: list(TEACHERS), metadata={
        "help": "label_free | reward | mix"})
    label_free: str = field(default="both+degraded", metadata={
        "help": "the label-free teacher: a preset the quickstart built preferences for"})
    raters: RaterSettings = field(default_factory=_default_raters, metadata={
        "help": "the simulated people (pairs_per_query x the train and val queries must reach "
                "the largest count)"})
    retrain: RetrainSettings = field(default_factory=_default_retrain, metadata={
        "help": "reward model and re-alignment (the same for every teacher and count)"})
    k: int = field(default=10, metadata={"help": "the measure's cut-off"})
    points: list[str] = field(default_factory=list, metadata={
        "help": "compute only these points, as teacher/votes (e.g. [reward/2000,mix/32000]; "
                "label_free/0 is always computed); the report still shows every finished point "
                "of teachers x counts (default: compute them all)"})

    def __post_init__(self) -> None:
        if not self.counts or any(n < 0 for n in self.counts):
            raise ValueError(f"counts must be a non-empty list of numbers >= 0: {self.counts}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        bad = [t for t in self.teachers if t not in TEACHERS]
        if bad or "label_free" not in self.teachers:
            raise ValueError(f"teachers {self.teachers}: from {list(TEACHERS)}, label_free "
                             "included (the reference)")
        self.counts = sorted(set(int(n) for n in self.counts))
        for p in self.points:
            t, _, n = p.partition("/")
            if t not in self.teachers or not n.isdigit() or int(n) not in self.counts:
                raise ValueError(f"point {p!r}: teacher/votes with a teacher of {self.teachers} "
                                 f"and votes of {self.counts}")

    def wanted(self, teacher: str, n: int) -> bool:
        """Whether this run computes the point (``points`` empty: every point)."""
        return not self.points or f"{teacher}/{n}" in self.points


@dataclass
class Prepared:
    """The inputs a prepared world directory holds."""

    world: Path
    base: Path
    embeddings: Path
    rephrased: Path
    label_free: Path

    @classmethod
    def of(cls, root: str | Path, label_free: str) -> Prepared:
        r = Path(root).resolve()
        p = cls(r / "world", r / "base" / "checkpoint", r / "embeddings", r / "rephrased",
                r / "preferences" / label_free.replace("+", "_").replace(":", "_"))
        missing = [str(v) for v in asdict(p).values() if not Path(v).exists()]
        if missing:
            raise FileNotFoundError(f"{root} is not a prepared world (python -m jobs.quickstart "
                                    f"workdir={root} ...): missing {missing}")
        return p


def vote_pool(world: Path, raters: RaterSettings, seed: int) -> tuple[pa.Table, dict[str, Any]]:
    """Every vote the seed's people cast, in the seeded order the counts take them from:
    pairs over the train and val splits' natural images, one vote each; a preferences table
    (source ``rater``; weight ``confidence / 5`` with ``weigh_by_confidence``) and the
    population's statistics."""
    from aligner.data.preferences import rows_to_table
    from aligner.world import World
    from aligner.world.raters import RaterPopulation, rater_name

    s = replace(raters, seed=seed)
    pop = RaterPopulation.from_world(World(world), s)
    rng = np.random.default_rng([seed, 41])
    q, a, b = [], [], []
    for salt, split in enumerate(("train", "val")):
        qs, xs, ys, _ = pop.candidate_pairs(split, s.pairs_per_query, seed * 1000 + 1 + salt)
        q += qs
        a += xs
        b += ys
    v = pop.image_votes(q, a, b, rng)
    order = rng.permutation(len(q))
    rows = []
    for i in order:
        win, lose = (a[i], b[i]) if v.prefers_a[i] else (b[i], a[i])
        rows.append({"query_id": q[i], "query": pop.queries[q[i]], "chosen_id": win,
                     "rejected_id": lose, "source": "rater",
                     "weight": float(v.confidence[i]) / 5 if s.weigh_by_confidence else 1.0,
                     "teacher": rater_name(int(v.rater[i]))})
    right = v.prefers_a == (v.du > 0)
    stats = {**pop.stats(), "pool": len(rows),
             "votes_agree_with_world_taste": float(right[v.du != 0].mean())}
    return rows_to_table(rows), stats


def _point_done(d: Path) -> dict[str, Any] | None:
    f = d / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _score(ckpt: Path, world: Path, d: Path, extra: dict[str, Any], k: int) -> dict[str, Any]:
    from aligner.evaluation.checkpoint import primary_metrics

    m = primary_metrics(ckpt, world, k=k)
    out = {"query_ids": m["query_ids"], **{key: m[key].tolist() for key in m
                                          if key.endswith(f"@{k}")}, **extra}
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps(out))
    return out


def run_curve(cfg: CurveConfig) -> dict[str, Any]:
    """Every point of the curve (skipping those done), then the summary, report and plot."""
    from aligner.feedback.retrain import build_teacher_preferences, realign, train_reward
    from aligner.runtime.manifest import write_manifest

    started = time.time()
    prep = Prepared.of(cfg.prepared, cfg.label_free)
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.name or Path(cfg.prepared).resolve().name
    points: dict[str, dict[str, Any]] = {}
    base = _point_done(out / "base") or _score(prep.base, prep.world, out / "base", {}, cfg.k)
    populations = {}
    for seed in cfg.seeds:
        st = replace(cfg.retrain, seed=seed)
        d = out / f"seed{seed}"
        lf = d / "label_free"
        got = _point_done(lf)
        if got is None:
            t0 = time.time()
            ckpt = realign(prep.world, prep.base, prep.label_free, lf / "aligned", st)
            got = _score(ckpt, prep.world, lf, {"seconds": round(time.time() - t0, 1)}, cfg.k)
        points[f"{seed}/label_free/0"] = got
        voted = [t for t in cfg.teachers if t != "label_free"]
        need = [n for n in cfg.counts if n > 0 and any(
            cfg.wanted(t, n) and _point_done(d / t / f"n{n}") is None for t in voted)]
        pool = None
        if need:
            pool, populations[seed] = vote_pool(prep.world, cfg.raters, seed)
            (d / "population.json").parent.mkdir(parents=True, exist_ok=True)
            (d / "population.json").write_text(json.dumps(populations[seed], indent=2))
            if pool.num_rows < max(need):
                raise ValueError(f"the raters cast {pool.num_rows} votes but the curve asks for "
                                 f"{max(need)}: raise raters.pairs_per_query")
        elif (d / "population.json").is_file():
            populations[seed] = json.loads((d / "population.json").read_text())
        for n in [n for n in cfg.counts if n > 0]:
            for teacher in voted:
                pd = d / teacher / f"n{n}"
                got = _point_done(pd)
                if got is None and not cfg.wanted(teacher, n):
                    continue
                if got is None:
                    assert pool is not None
                    t0 = time.time()
                    rdir = d / "reward_model" / f"n{n}"  # shared by reward and mix
                    reward = rdir / "checkpoint"
                    if not (reward / "reward.json").is_file():
                        train_reward(pool.slice(0, n), prep.world, prep.base, rdir, st)
                    t1 = time.time()
                    prefs = build_teacher_preferences(prep.world, prep.embeddings,
                                                      prep.rephrased, reward, teacher,
                                                      pd / "preferences", st)
                    t2 = time.time()
                    ckpt = realign(prep.world, prep.base, prefs, pd / "aligned", st)
                    t3 = time.time()
                    rm = json.loads((rdir / "metrics.json").read_text())
                    got = _score(ckpt, prep.world, pd, {
                        "votes": n, "reward_val_acc": rm.get("val_acc_vs_votes"),
                        "seconds": {"reward": round(t1 - t0, 1), "preferences": round(t2 - t1, 1),
                                    "align": round(t3 - t2, 1)}}, cfg.k)
                points[f"{seed}/{teacher}/{n}"] = got
                log.info("curve %s seed %d %s %d votes: %s %.4f", name, seed, teacher, n,
                         METRIC, float(np.nanmean(got[METRIC])))
    summary = summarise(points, base, cfg)
    summary.update({"world": name, "prepared": str(cfg.prepared), "populations": populations})
    (out / "curve.json").write_text(json.dumps(summary, indent=2))
    (out / "learning_curve.md").write_text(report_markdown(summary))
    plot_curves([summary], out / "learning_curve.png")
    write_manifest(out, "learning_curve", _cfg_dict(cfg), started,
                   inputs={"prepared": str(cfg.prepared)},
                   outputs={"summary": "curve.json", "report": "learning_curve.md",
                            "plot": "learning_curve.png"},
                   source="simulated raters (not people)")
    return summary


def _cfg_dict(cfg: CurveConfig) -> dict[str, Any]:
    from aligner.runtime.config import to_dict

    return to_dict(cfg)


def _point(points: dict[str, dict[str, Any]], seed: int, teacher: str,
           n: int) -> dict[str, Any] | None:
    """A finished point; at 0 votes every teacher is the label-free one."""
    return points.get(f"{seed}/label_free/0" if n == 0 else f"{seed}/{teacher}/{n}")


def _stack(points: dict[str, dict[str, Any]], seeds: list[int], teacher: str, n: int,
           key: str) -> tuple[np.ndarray, np.ndarray]:
    """Values of ``key`` over every seed's queries (and the queries, the bootstrap's groups)."""
    vals, groups = [], []
    for s in seeds:
        p = _point(points, s, teacher, n)
        assert p is not None
        vals.append(np.asarray(p[key], np.float64))
        groups += p["query_ids"]
    return np.concatenate(vals), np.asarray(groups)


def summarise(points: dict[str, dict[str, Any]], base: dict[str, Any],
              cfg: CurveConfig) -> dict[str, Any]:
    """Levels and paired differences (against the base and against the label-free teacher)
    per teacher and count, pooled over seeds, with cluster-bootstrap CIs over queries."""
    from aligner.evaluation.oracle_metrics import paired_difference

    seeds = list(cfg.seeds)
    # a row needs its point for every seed: a run that computed a subset reports that subset
    pairs = [(t, n) for t in cfg.teachers for n in cfg.counts if (t != "label_free" or n == 0)
             and all(_point(points, s, t, n) is not None for s in seeds)]
    b = {key: (np.concatenate([np.asarray(base[key], np.float64)] * len(seeds)),
               np.asarray(base["query_ids"] * len(seeds))) for key in MEASURES}
    rows = []
    for teacher, n in pairs:
        row: dict[str, Any] = {"teacher": teacher, "votes": n}
        for key in MEASURES:
            v, g = _stack(points, seeds, teacher, n, key)
            lf, _ = _stack(points, seeds, "label_free", 0, key)
            row[key] = paired_difference(v, np.zeros_like(v), groups=g)
            row[f"{key}_vs_base"] = paired_difference(v, b[key][0], groups=g)
            if teacher != "label_free":
                row[f"{key}_vs_label_free"] = paired_difference(v, lf, groups=g)
        per_seed = [float(np.nanmean(_point(points, s, teacher, n)[METRIC]))
                    for s in seeds]
        row["per_seed"] = per_seed
        rows.append(row)
    base_level = {key: paired_difference(b[key][0], np.zeros_like(b[key][0]), groups=b[key][1])
                  for key in MEASURES}
    return {"metric": METRIC, "counts": cfg.counts, "seeds": seeds, "rows": rows,
            "base": base_level, "targets": targets(rows)}


def _row(rows: list[dict[str, Any]], teacher: str, n: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["teacher"] == teacher and r["votes"] == n), None)


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets of docs/learning_curve.md read off the rows: the smallest count at which the
    reward teacher beats the label-free one with a CI above 0; the teachers against the base;
    the mix's non-inferiority to the label-free teacher (margin 0.01) at every count."""
    out: dict[str, Any] = {}
    counts = sorted({r["votes"] for r in rows if r["votes"]})
    beat = [n for n in counts if (r := _row(rows, "reward", n))
            and r[f"{METRIC}_vs_label_free"]["ci_low"] > 0]
    out["reward_beats_label_free_from"] = beat[0] if beat else None
    r2k = _row(rows, "reward", 2000)
    out["reward_beats_label_free_at_2000"] = (
        None if r2k is None else bool(r2k[f"{METRIC}_vs_label_free"]["ci_low"] > 0))
    out["vs_base"] = {f"{r['teacher']}/{r['votes']}": r[f"{METRIC}_vs_base"] for r in rows}
    mix = [r for r in rows if r["teacher"] == "mix"]
    out["mix_non_inferior_every_count"] = (
        None if not mix else all(r[f"{METRIC}_vs_label_free"]["ci_low"] > -0.01 for r in mix))
    out["mix_counts_measured"] = [r["votes"] for r in mix]
    out["reward_counts_measured"] = [r["votes"] for r in rows if r["teacher"] == "reward"]
    return out


def _fmt(d: dict[str, float], signed: bool = False) -> str:
    if d.get("mean") is None or not np.isfinite(d.get("mean", np.nan)):
        return "n/a"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(d['mean'])} [{f.format(d['ci_low'])}, {f.format(d['ci_high'])}]"


def report_markdown(s: dict[str, Any]) -> str:
    """The curve as a Markdown table (levels and differences with 95% CIs)."""
    lines = [f"# Learning curve: {s['world']}", "",
             f"{METRIC} (gain match x beauty, dense held-out test gallery), seeds {s['seeds']}, "
             "95% cluster-bootstrap CIs over queries. Base: "
             f"{_fmt(s['base'][METRIC])}.", "",
             "| teacher | votes | nDCG@10 | vs base | vs label-free | precision@10 vs base "
             "| per seed |", "|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lf = r.get(f"{METRIC}_vs_label_free")
        lines.append(f"| {r['teacher']} | {r['votes']:,} | {_fmt(r[METRIC])} | "
                     f"{_fmt(r[f'{METRIC}_vs_base'], True)} | "
                     f"{_fmt(lf, True) if lf else '-'} | "
                     f"{_fmt(r['precision@10_vs_base'], True)} | "
                     f"{', '.join(f'{v:.3f}' for v in r['per_seed'])} |")
    t = s["targets"]
    lines += ["", f"Targets: reward beats label-free (CI above 0) from "
              f"{t['reward_beats_label_free_from']} votes; at 2,000: "
              f"{t['reward_beats_label_free_at_2000']}; mix non-inferior to label-free "
              f"(margin 0.01) at every count measured ({t['mix_counts_measured']}): "
              f"{t['mix_non_inferior_every_count']}.", ""]
    return "\n".join(lines)


def plot_curves(summaries: list[dict[str, Any]], path: str | Path) -> Path:
    """One column per world: above, nDCG@10 against votes (symlog axis) per teacher with 95%
    CIs and the base as a dashed line; below, each teacher minus the label-free one, paired
    per query (the comparison the targets read; its CI is much narrower than the levels')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(summaries), figsize=(5.5 * len(summaries), 7.5),
                             squeeze=False, sharex=True)
    colours = {"label_free": "#777777", "reward": "#d62728", "mix": "#1f77b4"}
    for col, s in enumerate(summaries):
        top, bottom = axes[0][col], axes[1][col]
        base = s["base"][METRIC]
        top.axhline(base["mean"], ls="--", c="k", lw=1, label="base")
        bottom.axhline(0, c=colours["label_free"], lw=1, label="label-free")
        lf = next(r for r in s["rows"] if r["teacher"] == "label_free")[METRIC]
        xs = s["counts"]
        top.plot(xs, [lf["mean"]] * len(xs), c=colours["label_free"], label="label-free")
        top.fill_between(xs, lf["ci_low"], lf["ci_high"], color=colours["label_free"],
                         alpha=0.12)
        for teacher in ("reward", "mix"):
            rows = sorted([r for r in s["rows"] if r["teacher"] == teacher],
                          key=lambda r: r["votes"])
            if len(rows) < 2:
                continue
            x = [r["votes"] for r in rows]
            for ax, key in ((top, METRIC), (bottom, f"{METRIC}_vs_label_free")):
                m = np.array([r[key]["mean"] for r in rows])
                lo = m - np.array([r[key]["ci_low"] for r in rows])
                hi = np.array([r[key]["ci_high"] for r in rows]) - m
                ax.errorbar(x, m, yerr=[lo, hi], marker="o", capsize=3, c=colours[teacher],
                            label=teacher)
        for ax in (top, bottom):
            ax.set_xscale("symlog", linthresh=500)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        top.set_title(f"{s['world']} (seeds {s['seeds']})")
        top.set_ylabel("nDCG@10 (match x beauty)")
        bottom.set_ylabel("minus label-free (paired)")
        bottom.set_xlabel("votes")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
