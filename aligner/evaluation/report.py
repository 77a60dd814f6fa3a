"""The evaluation report: one self-contained HTML page and one PNG summary.

Input is the evaluation's ``metrics.json`` content (:mod:`aligner.data.results`) plus what does not
belong in JSON: per-query values for the gain histogram and image grids of top results. The
HTML holds a systems x metrics table with 95% CIs, the verdict sentences (including where the
aligned model does not win), the comparisons, the teacher diagnostics, the plots and the
grids, all inline (images as data URIs), so the file can be mailed or attached to an issue.
When a judge's output is given or lies beside the report (``judge/summary.json``, written by
``jobs.judge``), the page also shows the judge's win rates (:func:`judge_html`);
:func:`add_judge_summary` puts them into an existing report after the judge has run.
``report.png`` is the summary plot stacked over the first grid, for people who won't open HTML.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from aligner.runtime.grids import GridItem, Row, data_uri, rows_grid_png

_CSS = """body{font-family:sans-serif;margin:1.2em;max-width:1400px}
h1{font-size:1.35em}h2{font-size:1.12em;margin-top:1.6em}h3{font-size:1em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}
.ci{color:#777;font-size:11px}.win{color:#17692a;font-weight:bold}.loss{color:#a31515}
.note{color:#555;font-size:13px}ul.verdict li{margin:.3em 0}
.row{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:.6em;align-items:flex-start}
.rowlabel{width:120px;font-size:12px;font-weight:bold}
figure{margin:0;width:118px;font-size:11px}figure img{width:112px;image-rendering:pixelated}
figcaption{white-space:pre-line}.miss{background:#fde8e8}"""


def fmt_ci(d: Mapping[str, Any] | None, digits: int = 3, scale: float = 1.0,
           signed: bool = False) -> str:
    """``0.123 [0.100, 0.150]`` from a ``ci_dict`` (``n/a`` when missing)."""
    if not d or d.get("mean") is None or not _finite(d["mean"]):
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    s = f.format(d["mean"] * scale)
    if "ci_low" in d and _finite(d.get("ci_low")):
        s += f" [{d['ci_low'] * scale:.{digits}f}, {d['ci_high'] * scale:.{digits}f}]"
    return s


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _cell(d: Mapping[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    if not d or not _finite(d.get("mean")):
        return "<td>n/a</td>"
    ci = ""
    if _finite(d.get("ci_low")):
        ci = f"<br><span class='ci'>[{d['ci_low']:.{digits}f}, {d['ci_high']:.{digits}f}]</span>"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    cls = ""
    if signed and _finite(d.get("ci_low")):
        cls = " class='win'" if d["ci_low"] > 0 else " class='loss'" if d["ci_high"] < 0 else ""
    return f"<td{cls}>{f.format(d['mean'])}{ci}</td>"



def _points(d: Mapping[str, Any] | None) -> str:
    if not d or not _finite(d.get("mean")):
        return "n/a"
    s = f"{d['mean'] * 100:+.1f} points"
    if _finite(d.get("ci_low")):
        s += f" [{d['ci_low'] * 100:+.1f}, {d['ci_high'] * 100:+.1f}]"
    return s


def verdict_sentences(metrics: Mapping[str, Any], recall_tolerance: float = 0.02) -> list[str]:
    """Plain sentences: where the aligned system wins, where it does not, what it costs.

    A win needs the paired CI of the primary metric (``metrics["primary"]``: nDCG@K with gain
    match x beauty when there is an oracle) above 0; a CI that includes 0 is said to be "does
    NOT beat".
    A recall@10 drop larger than ``recall_tolerance`` whose CI excludes 0 gets its own
    sentence.
    """
    aligned, primary = metrics.get("aligned_name", "aligned"), metrics.get("primary", "")
    k = metrics.get("k", 10)
    comp = metrics.get("comparisons") or {}
    if not comp:
        return [f"No system named '{aligned}' was evaluated: nothing to compare."]
    out, wins, rest = [], [], []
    for other, c in comp.items():
        d = c.get(f"{primary}_diff")
        if not d or not _finite(d.get("mean")):
            continue
        r, p = c.get("recall@10_diff"), c.get(f"precision@{k}_diff")
        ha, hc = c.get("hpir_aesthetics_diff"), c.get("hpir_accuracy_diff")
        diff = fmt_ci(d, signed=True)
        rtxt = f"recall@10 {_points(r)}"
        if _finite(d.get("ci_low")) and d["ci_low"] > 0:
            s = f"{aligned} beats {other} on {primary} by {diff} at {rtxt}"
            wins.append(other)
        elif _finite(d.get("ci_high")) and d["ci_high"] < 0:
            s = f"{aligned} is WORSE than {other} on {primary}: {diff} ({rtxt})"
            rest.append(other)
        else:
            s = f"{aligned} does NOT beat {other} on {primary}: {diff}, the CI includes 0 ({rtxt})"
            rest.append(other)
        if p and _finite(p.get("ci_high")) and p["ci_high"] < 0:
            s += f"; content precision@{k} falls by {-p['mean']:.3f}"
        if ha and _finite(ha.get("mean")):
            s += f"; HPIR-aesthetics {_points(ha)}"
        if hc and _finite(hc.get("mean")):
            s += f", HPIR-accuracy {_points(hc)}"
        out.append(s + ".")
        if r and _finite(r.get("ci_high")) and r["mean"] < -recall_tolerance and r["ci_high"] < 0:
            out.append(f"{aligned} loses recall@10 against {other}: {_points(r)}, more than the "
                       f"{recall_tolerance * 100:.1f}-point tolerance.")
    out += equal_relevance_sentences(metrics)
    lat = latency_sentence(metrics)
    if lat:
        out.append(lat)
    head = f"{aligned} wins on {primary} against {len(wins)} of {len(wins) + len(rest)} systems"
    head += f" ({', '.join(wins)})" if wins else ""
    head += f"; it does NOT win against {', '.join(rest)}." if rest else "."
    if not metrics.get("oracle", True):
        out.append(f"No oracle: {primary} is the low-level scorer's view, which cascade and "
                   "query_shift optimise directly.")
    return [head, *out]

def equal_relevance_sentences(metrics: Mapping[str, Any]) -> list[str]:
    """One sentence per swept baseline family: the aligned model against the family's best
    setting whose relevance is at least the aligned model's, chosen on the selection queries
    and compared on the held-out ones (:mod:`aligner.evaluation.sweeps`)."""
    eq = metrics.get("equal_relevance") or {}
    fams = eq.get("families") or {}
    if not fams:
        return []
    aligned, primary, k = (metrics.get("aligned_name", "aligned"), metrics.get("primary", ""),
                           metrics.get("k", 10))
    target = eq.get("aligned_selection") or eq.get("aligned") or {}
    rec, slack = target.get("recall@10"), float(eq.get("slack") or 0.0)
    chosen, reported = eq.get("chosen_on"), eq.get("reported_on")
    where = (f" on the {chosen} queries" if chosen else "")
    cond = (f"precision@{k} >= {target.get(f'precision@{k}', float('nan')) - slack:.3f}"
            + (f" and recall@10 >= {rec - slack:.3f}" if _finite(rec) else ""))
    out = []
    for fam, r in fams.items():
        if not r.get("setting"):
            out.append(f"At equal or better relevance{where} ({cond}) no {fam} setting "
                       f"qualifies: every swept {fam} setting is less relevant than {aligned}.")
            continue
        d = r.get(f"{primary}_diff") or {}
        verb = ("beats" if _finite(d.get("ci_low")) and d["ci_low"] > 0 else
                "is WORSE than" if _finite(d.get("ci_high")) and d["ci_high"] < 0 else
                "does NOT beat")
        on = f" on the {reported} queries" if reported and reported != chosen else ""
        out.append(f"At equal or better relevance{where} ({cond}), {aligned} {verb} the best "
                   f"{fam} setting ({r['setting']}, chosen there){on}: {primary} "
                   f"{fmt_ci(r.get(primary))}, difference {fmt_ci(d, signed=True)}.")
    if eq.get("fallback"):
        out.append(f"Caution: {eq['fallback']}.")
    return out


def latency_sentence(metrics: Mapping[str, Any]) -> str:
    """Milliseconds per query of the base, the aligned model and the re-rankers."""
    systems = metrics.get("systems") or {}
    names = [metrics.get("aligned_name", "aligned"), metrics.get("base_name", "base"),
             "teacher_rerank", "cascade", "rephrase"]
    parts = [f"{n} {systems[n]['timing']['ms_per_query']:.2f}" for n in dict.fromkeys(names)
             if n in systems and _finite((systems[n].get("timing") or {}).get("ms_per_query"))]
    if len(parts) < 2:
        return ""
    llm = [f"{n} includes {t['llm']['backend']}'s call ({t['llm']['ms_per_query']:.0f} ms)"
           for n in ("rephrase", "teacher_rerank") if n in systems
           for t in [systems[n].get("timing") or {}] if (t.get("llm") or {}).get("measured")]
    unmeasured = [n for n in ("rephrase", "teacher_rerank") if n in systems and
                  (systems[n].get("timing") or {}).get("llm") is not None and
                  not systems[n]["timing"]["llm"].get("measured")]
    out = ("Latency (ms per query, encode + search, caches cleared): " + ", ".join(parts)
           + ("; teacher_rerank pays at query time for the teacher's extra text encodings "
              "and the scoring of its top N, the aligned model only for its query"
              if "teacher_rerank" in systems else ""))
    if llm:
        out += "; the query-time LLM rephrasing is included: " + "; ".join(llm)
    if unmeasured:
        out += f"; for {', '.join(unmeasured)} the LLM call is NOT included (see the notes)"
    return out + "."


def frontier_html(metrics: Mapping[str, Any]) -> str:
    """The swept settings of every baseline family as one table."""
    front = metrics.get("frontier") or {}
    if not front:
        return "<p class='note'>No baseline sweep (sweep=false or no oracle).</p>"
    k, primary = metrics.get("k", 10), metrics.get("primary", "")
    eq = metrics.get("equal_relevance") or {}
    best = {r.get("setting") for r in (eq.get("families") or {}).values()}
    chosen = html.escape(str(eq.get("chosen_on") or "selection"))
    reported = html.escape(str(eq.get("reported_on") or "held-out"))
    rows = [f"<table><tr><th>setting</th><th>{html.escape(primary)} ({reported})</th>"
            f"<th>precision@{k} ({reported})</th><th>recall@10 ({reported})</th>"
            f"<th>{html.escape(primary)} ({chosen})</th><th>precision@{k} ({chosen})</th>"
            f"<th>recall@10 ({chosen})</th></tr>"]

    def num(x: Any) -> str:
        return f"{x:.3f}" if _finite(x) else "n/a"

    for fam_rows in front.values():
        for r in fam_rows:
            mark = " class='win'" if r["setting"] in best else ""
            rec = r.get("recall@10")
            sel = r.get("selection") or {}
            srec = sel.get("recall@10")
            rows.append(f"<tr><td{mark}>{html.escape(r['setting'])}</td>{_cell(r.get(primary))}"
                        f"<td>{r.get(f'precision@{k}', float('nan')):.3f}</td>"
                        f"<td>{'inner model' if rec is None else f'{rec:.3f}'}</td>"
                        f"<td>{num(sel.get(primary))}</td><td>{num(sel.get(f'precision@{k}'))}"
                        f"</td><td>{'inner model' if srec is None and sel else num(srec)}</td>"
                        "</tr>")
    sel_info = eq.get("selection") or {}
    rows.append("</table><p class='note'>Bold green: the family's best setting at equal or "
                f"better relevance than the aligned model, chosen on the {chosen} queries "
                f"({sel_info.get('queries', '?')} queries; recall on "
                f"{html.escape(str(sel_info.get('recall', '')))}) and reported on the "
                f"{reported} queries, where the verdict compares it with the aligned model."
                + (f" <b>{html.escape(str(eq['fallback']))}</b>." if eq.get("fallback") else "")
                + "</p>")
    return "".join(rows)


def teacher_rerank_html(metrics: Mapping[str, Any]) -> str:
    """Which teacher the teacher_rerank baseline applies, and where it was read."""
    t = metrics.get("teacher_rerank")
    if not t:
        return ("<p class='note'>teacher_rerank not evaluated (the training teacher is unknown "
                "or the baseline was not asked for; see the notes).</p>")
    notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in t.get("notes") or [])
    name = html.escape(str(t.get("teacher")))
    return (f"<p class='note'>teacher_rerank applies the teacher <b>{name}</b> at query time "
            f"(bad rephrase: {html.escape(str(t.get('bad_rephrase')))}; "
            f"rephrasings: {html.escape(str(t.get('rephrasings')))}; scorer: "
            f"{html.escape(str(t.get('scorer')))}). Read from: "
            f"{html.escape(str(t.get('source')))}.</p>" + (f"<ul>{notes}</ul>" if notes else ""))


def systems_table_html(metrics: Mapping[str, Any]) -> str:
    """Systems x metrics, with CIs."""
    k = metrics.get("k", 10)
    also = metrics.get("also_ks", [])
    cols = [("recall", "r@1", "R@1"), ("recall", "r@5", "R@5"), ("recall", "r@10", "R@10"),
            (None, f"ndcg@{k}", f"<b>nDCG@{k}</b> (gain match &times; beauty)"),
            (None, f"ndcg@{k}_vs_base", f"&Delta; nDCG@{k} vs base"),
            (None, f"beauty_relevant@{k}", f"beauty among relevant (top {k})"),
            (None, f"beauty_relevant@{k}_vs_base", "&Delta; vs base"),
            (None, f"precision@{k}", f"precision@{k}"),
            ("hpir_aesthetics", "oracle", "HPIR-aesthetics"),
            ("hpir_accuracy", "oracle", "HPIR-accuracy")]
    cols += [(None, f"ndcg@{j}", f"nDCG@{j}") for j in also]
    cols += [(None, f"aesthetic@{k}", f"aesthetic@{k} (diagnostic: wrong content included)"),
             (None, f"scorer_aesthetic@{k}", f"scorer aesthetic@{k}")]
    rows = ["<table><tr><th>system</th><th>kind</th>"
            + "".join(f"<th>{h}</th>" for *_, h in cols) + "<th>ms / query</th></tr>"]
    for name, s in metrics.get("systems", {}).items():
        cells = [f"<td>{html.escape(name)}</td><td>{html.escape(s.get('kind', ''))}"
                 + (f"<br><span class='ci'>recall: {html.escape(s['recall'].get('transform', ''))}"
                    "</span>" if s.get("recall") else "") + "</td>"]
        for group, key, _ in cols:
            d = (s.get(group) or {}).get(key) if group else s.get(key)
            cells.append(_cell(d, signed=key.endswith("_vs_base")))
        t = s.get("timing", {})
        cells.append(f"<td>{t['ms_per_query']:.2f}</td>" if "ms_per_query" in t else "<td>n/a</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def gallery_html(metrics: Mapping[str, Any]) -> str:
    """The galleries searched and how many relevant images each query has there."""
    g = metrics.get("gallery") or {}
    rows = ["<table><tr><th>gallery</th><th>split</th><th>images</th><th>queries</th>"
            "<th>relevant per query: min</th><th>p10</th><th>median</th><th>mean</th>"
            "<th>max</th><th>queries with &lt; 10</th></tr>"]
    for label, part in (("held-out (reported)", g.get("held_out")),
                        ("selection (choices)", g.get("selection"))):
        if not part:
            continue
        d = part.get("relevant_per_query") or {}
        nums = "".join(f"<td>{d[c]:.0f}</td>" if _finite(d.get(c)) else "<td>n/a</td>"
                       for c in ("min", "p10", "median", "mean", "max", "under_10"))
        rows.append(f"<tr><td>{label}</td><td>{html.escape(str(part.get('split') or 'all'))}"
                    f"</td><td>{part.get('images', 'n/a')}</td><td>{d.get('queries', 'n/a')}"
                    f"</td>{nums}</tr>")
    rows.append("</table><p class='note'>Beauty among relevant results can only show where a "
                "query has many relevant images with a spread of looks (docs/evaluation.md "
                "&sect;1).</p>")
    return "\n".join(rows)


def hpir_html(metrics: Mapping[str, Any]) -> str:
    """HPIR per aspect: each system's agreement with the oracle's and the raters' row labels."""
    info = metrics.get("hpir") or {}
    aspects = [a for a in ("aesthetics", "accuracy") if a in (info.get("aspects") or {})]
    if not aspects:
        return "<p class='note'>HPIR not computed (no oracle).</p>"
    head = "".join(f"<th>{a}: oracle</th><th>{a}: raters</th><th>{a}: raters, confidence-"
                   "weighted</th>" for a in aspects)
    rows = [f"<table><tr><th>system</th>{head}</tr>"]
    for name, s in (metrics.get("systems") or {}).items():
        cells = "".join(_cell((s.get(f"hpir_{a}") or {}).get(lab)) for a in aspects
                        for lab in ("oracle", "raters", "raters_weighted"))
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    rows.append("</table>")
    notes = []
    for a in aspects:
        d = info["aspects"][a]
        ceiling = fmt_ci(d.get("ceiling"))
        notes.append(f"{a}: {d.get('pairs', 0)} row pairs ({d.get('ties_dropped', 0)} ties "
                     f"dropped, {d.get('skipped_queries', 0)} queries without such a pair); "
                     f"two simulated raters agree on {d.get('rater_agreement', float('nan')):.2f}"
                     f" of them; the oracle agrees with the raters on {ceiling} (the ceiling)")
    rows.append("<p class='note'>" + html.escape(
        f"Rows of {info.get('row_size', 5)} images from {info.get('pool', 'the base top 50')}. "
        "Aesthetics pairs: both rows show the same number of relevant images, labelled by "
        "the beauty of those; accuracy pairs: different numbers, labelled by it. "
        + "; ".join(notes) + ".") + "</p>")
    return "\n".join(rows)


def comparisons_table_html(metrics: Mapping[str, Any]) -> str:
    """Aligned minus each other system (paired over queries / captions)."""
    comp = metrics.get("comparisons", {})
    if not comp:
        return "<p class='note'>No comparisons (no aligned system).</p>"
    kk = metrics.get("k", 10)
    keys = [f"ndcg@{kk}_diff", f"beauty_relevant@{kk}_diff", f"precision@{kk}_diff",
            "recall@10_diff", "hpir_aesthetics_diff", "hpir_accuracy_diff"]
    keys += [f"ndcg@{j}_diff" for j in metrics.get("also_ks", [])]
    keys += [f"aesthetic@{kk}_diff", f"scorer_aesthetic@{kk}_diff"]
    aligned = html.escape(metrics.get("aligned_name", "aligned"))
    rows = [f"<table><tr><th>{aligned} minus</th>"
            + "".join(f"<th>{html.escape(k.removesuffix('_diff'))}</th>" for k in keys) + "</tr>"]
    for other, c in comp.items():
        rows.append(f"<tr><td>{html.escape(other)}</td>"
                    + "".join(_cell(c.get(k), signed=True) for k in keys) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)



def pairwise_html(metrics: Mapping[str, Any]) -> str:
    """Row minus column on the primary metric, paired over queries (every pair of systems)."""
    primary = metrics.get("primary", "")
    pw = (metrics.get("pairwise") or {}).get(primary) or {}
    if not pw:
        return ""
    names = list(pw)
    rows = [f"<table><tr><th>{html.escape(primary)}: row minus column</th>"
            + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"]
    for a in names:
        rows.append(f"<tr><td>{html.escape(a)}</td>" + "".join(
            "<td></td>" if a == b else _cell(pw[a].get(b), signed=True) for b in names) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)

def teacher_html(teacher: Mapping[str, Any]) -> str:
    """Per preference table and source: agreement with the oracle."""
    if not teacher:
        return "<p class='note'>No preference tables given.</p>"
    rows = ["<table><tr><th>table / source</th><th>pairs</th><th>oracle pairs</th>"
            "<th>agreement</th><th>weighted</th><th>beauty margin</th><th>degraded pairs</th>"
            "<th>unknown ids</th></tr>"]
    for table, diag in teacher.items():
        if "error" in diag:
            rows.append(f"<tr><td>{html.escape(table)}</td><td colspan=7>"
                        f"{html.escape(str(diag['error']))}</td></tr>")
            continue
        parts = [("all", diag["all"])] + list(diag.get("by_source", {}).items())
        for src, d in parts:
            deg = str(d["degraded_pairs"])
            if d.get("degraded_pairs"):
                deg += f" ({html.escape(d.get('degraded_agreement', ''))})"
            rows.append(f"<tr><td>{html.escape(table)} / {html.escape(src)}</td>"
                        f"<td>{d['pairs']}</td><td>{d['oracle_pairs']}</td>"
                        + _cell(d["agreement"]) + _cell(d["agreement_weighted"])
                        + _cell(d["beauty_margin"], signed=True)
                        + f"<td>{deg}</td><td>{d['unknown_ids']}</td></tr>")
    rows.append("</table><p class='note'>Agreement: fraction of pairs whose chosen image has "
                "higher oracle beauty than the rejected one (0.5 = a blind teacher). Degraded "
                "copies are not in the oracle; their pairs agree by construction.</p>")
    return "\n".join(rows)


def premise_html(premise: Mapping[str, Any] | None) -> str:
    if not premise:
        return "<p class='note'>Not computed.</p>"
    rows = ["<table><tr><th>premise (base model)</th><th>value</th></tr>"]
    for key, d in premise.items():
        if isinstance(d, Mapping):
            rows.append(f"<tr><td>{html.escape(key)}</td>{_cell(d, signed=key.endswith('gain'))}"
                        "</tr>")
    rows.append("</table><p class='note'>Does adding generic good-photo words to a query make "
                "the base model's top 10 more beautiful among the relevant results, without "
                "losing relevance? The rephrase teacher relies on it.</p>")
    return "\n".join(rows)


def summary_figure(metrics: Mapping[str, Any], gains: np.ndarray | None, path: str | Path,
                   dpi: int = 100) -> Path:
    """Aesthetic@K vs recall@10 per system (CI bars) and the per-query gain histogram."""
    from matplotlib.figure import Figure

    key = metrics.get("primary", f"aesthetic@{metrics.get('k', 10)}")
    fig = Figure(figsize=(11, 4.2))
    ax, ax2 = fig.subplots(1, 2)
    for name, s in metrics.get("systems", {}).items():
        a = s.get(key)
        r = (s.get("recall") or {}).get("r@10")
        if not a or not _finite(a.get("mean")):
            continue
        x = r["mean"] if r and _finite(r.get("mean")) else 0.0
        xerr = [[x - r["ci_low"]], [r["ci_high"] - x]] if r and _finite(r.get("ci_low")) else None
        yerr = [[a["mean"] - a["ci_low"]], [a["ci_high"] - a["mean"]]] \
            if _finite(a.get("ci_low")) else None
        marker = "*" if name == metrics.get("aligned_name") else "o"
        ax.errorbar(x, a["mean"], xerr=xerr, yerr=yerr, fmt=marker, ms=10 if marker == "*" else 6,
                    capsize=3, label=name)
        ax.annotate(name, (x, a["mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    label = f"{key} (gain match x beauty)" if key.startswith("ndcg@") else key
    ax.set(xlabel="recall@10 (held-out captions)", ylabel=label,
           title=f"{key} vs recall@10 (95% CI)")
    ax.grid(alpha=0.3)
    if any(ax.get_legend_handles_labels()[1]):
        ax.legend(fontsize=7, loc="best")
    base, aligned = metrics.get("base_name", "base"), metrics.get("aligned_name", "aligned")
    if gains is not None and len(gains):
        g = np.asarray(gains, np.float64)
        g = g[np.isfinite(g)]
        ax2.hist(g, bins=min(30, max(5, len(g) // 4)), color="#4c72b0", alpha=0.85)
        ax2.axvline(0, color="k", lw=1)
        ax2.axvline(g.mean(), color="#c44e52", lw=2, label=f"mean {g.mean():+.3f}")
        ax2.legend(fontsize=8)
        ax2.set(xlabel=f"{key}: {aligned} minus {base}", ylabel="queries",
                title=f"per-query gain ({(g > 0).mean():.0%} of queries better)")
    else:
        ax2.text(0.5, 0.5, f"no per-query gain\n(needs systems '{base}' and '{aligned}')",
                 ha="center", va="center", transform=ax2.transAxes)
        ax2.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


JUDGE_DIR = "judge"
JUDGE_SUMMARY = "summary.json"
_JUDGE_START, _JUDGE_END = "<!-- judge -->", "<!-- /judge -->"


def read_judge_summary(path: str | Path) -> dict[str, Any]:
    """A judge's ``summary.json`` (``path`` is the judge output or the file).

    Raises:
        FileNotFoundError: no summary there.
        ValueError: not a JSON object.
    """
    import json

    p = Path(path)
    f = p / JUDGE_SUMMARY if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no judge summary at {p} (run jobs.judge)")
    data = json.loads(f.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{f} does not hold a JSON object")
    return data


def judge_html(summary: Mapping[str, Any]) -> str:
    """The judge's section: b's win, loss, similar and win + similar/2 with CIs, overall and
    per aspect; a proxy judge is named as a proxy."""
    a, b = summary.get("system_a", "a"), summary.get("system_b", "b")
    who = html.escape(str(summary.get("judge", "")))
    if summary.get("proxy"):
        who += " <b>(a proxy judge, not an LMM: not evidence of human preference)</b>"
    head = ("<tr><th>aspect</th><th>win</th><th>loss</th><th>similar</th>"
            "<th>win + similar/2</th></tr>")
    rows = []
    for name, r in [("overall", summary.get("overall"))] + list(
            (summary.get("aspects") or {}).items()):
        if not r:
            continue
        rows.append(f"<tr><td>{html.escape(name)}</td>" + "".join(
            _cell(r.get(k)) for k in ("win", "loss", "similar", "win_plus_half_similar"))
            + "</tr>")
    agree = summary.get("orders_agree")
    failed = summary.get("failed", 0)
    return "\n".join([
        _JUDGE_START, "<h2 id='judge'>Pairwise judge</h2>",
        f"<p class='note'>{html.escape(str(b))} (row b) vs {html.escape(str(a))} (row a), "
        f"judged by {who}, style {html.escape(str(summary.get('style', '')))}"
        f"{' prompt ' + html.escape(str(summary['prompt'])) if summary.get('prompt') else ''}"
        f", on {summary.get('queries', 0)} queries. Each pair was judged in both orders; a "
        "win counts only when both orders agree, otherwise it is 'similar'"
        + (f" (orders agreed on {agree:.0%})" if _finite(agree) else "") + ". "
        "Rates of b with bootstrap 95% CIs over queries"
        + (f"; {failed} pairs could not be judged" if failed else "") + ".</p>",
        f"<table>{head}{''.join(rows)}</table>",
        f"<p class='note'>{html.escape(str(summary.get('sentence', '')))}</p>", _JUDGE_END])


def judge_section(report_dir: str | Path, judge: str | Path) -> str:
    """The judge's section for the report in ``report_dir``; a note instead of the numbers
    when the judge read other rankings than the ``rankings.parquet`` beside the report (an
    earlier evaluation's: the judge must run again).

    Raises:
        FileNotFoundError: no judge summary.
    """
    from aligner.runtime.manifest import file_sha256

    summary = read_judge_summary(judge)
    here = Path(report_dir) / "rankings.parquet"
    made_from = summary.get("rankings_sha256")
    if made_from and here.is_file() and file_sha256(here)[:16] != made_from:
        return "\n".join([
            _JUDGE_START, "<h2 id='judge'>Pairwise judge</h2>",
            f"<p class='note'>The judge output at {html.escape(str(judge))} judged other "
            "rankings than this evaluation's (an earlier run): its numbers are not shown. "
            "Run jobs.judge again.</p>", _JUDGE_END])
    return judge_html(summary)


def add_judge_summary(report_dir: str | Path, judge: str | Path | None = None) -> Path:
    """Put (or replace) the judge's section in an existing ``report.html``.

    Args:
        report_dir: the evaluation output holding ``report.html``.
        judge: the judge output (default ``report_dir/judge``).

    Raises:
        FileNotFoundError: no report or no judge summary.
    """
    page = Path(report_dir) / "report.html"
    if not page.is_file():
        raise FileNotFoundError(f"no report.html in {report_dir}")
    section = judge_section(report_dir, judge or Path(report_dir) / JUDGE_DIR)
    text = page.read_text(encoding="utf-8")
    if _JUDGE_START in text and _JUDGE_END in text:
        lo = text.index(_JUDGE_START)
        hi = text.index(_JUDGE_END) + len(_JUDGE_END)
        text = text[:lo] + section + text[hi:]
    elif "<h2 id='grids'>" in text:
        text = text.replace("<h2 id='grids'>", section + "\n<h2 id='grids'>", 1)
    else:
        text = text.replace("</body>", section + "\n</body>", 1)
    page.write_text(text, encoding="utf-8")
    return page


def grid_html(title: str, rows: Sequence[Row]) -> str:
    """One query's labelled rows of results (one row per system)."""
    parts = [f"<h3>{html.escape(title)}</h3>"]
    for label, items in rows:
        parts.append(f"<div class='row'><div class='rowlabel'>{html.escape(label)}</div>")
        for raw in items:
            it = GridItem.of(raw)
            uri = data_uri(it.image, 128)
            miss = isinstance(raw, Mapping) and raw.get("match") is False
            img = f"<img src='{uri}' alt='{html.escape(it.label)}'>" if uri else "no image"
            parts.append(f"<figure{' class=miss' if miss else ''}>{img}<figcaption>"
                         f"{html.escape(it.text(24, 2))}</figcaption></figure>")
        parts.append("</div>")
    return "\n".join(parts)


def _png_uri(path: Path) -> str:
    return data_uri(path.read_bytes(), 10_000) or ""


def stack_pngs(paths: Sequence[Path], out: Path) -> Path:
    """Stack PNGs vertically (left-aligned, white padding)."""
    ims = [Image.open(p).convert("RGB") for p in paths]
    w = max(im.width for im in ims)
    canvas = Image.new("RGB", (w, sum(im.height for im in ims)), "white")
    y = 0
    for im in ims:
        canvas.paste(im, (0, y))
        y += im.height
    canvas.save(out, format="PNG")
    return out


def write_report(out_dir: str | Path, metrics: Mapping[str, Any],
                 gains: np.ndarray | None = None,
                 grids: Sequence[tuple[str, Sequence[Row]]] = (),
                 judge: str | Path | None = None) -> dict[str, Path]:
    """Write ``report.html`` and ``report.png`` (and ``summary.png``) into ``out_dir``.

    Args:
        metrics: the evaluation's metrics (``systems``, ``comparisons``, ``verdict``,
            ``teacher``, ``premise``, ``skipped``, ``k``, names ...).
        gains: per-query aesthetic@K of the aligned system minus the base (histogram).
        grids: ``[(query text, [(system, items), ...]), ...]``; items are GridItem-like dicts
            (``image`` bytes, ``label``; ``match: False`` highlights an off-content result).
        judge: a ``jobs.judge`` output whose summary the page shows (default: ``judge/``
            beside the report, when it holds a summary).

    Returns:
        ``{"html": path, "png": path, "summary": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_figure(metrics, gains, out / "summary.png")
    frontier_png = None
    if metrics.get("frontier"):
        from aligner.evaluation.sweeps import frontier_figure

        frontier_png = frontier_figure(metrics["frontier"], metrics.get("systems", {}),
                                       metrics.get("primary", ""), f"precision@{metrics['k']}",
                                       out / "frontier.png", metrics.get("aligned_name",
                                                                         "aligned"))
    grid_png = None
    if grids:
        title, rows = grids[0]
        grid_png = rows_grid_png(list(rows), out / "grid_0.png", title=f"query: {title}",
                                 thumb=1.45)
    stack_pngs([summary] + ([frontier_png] if frontier_png else []) +
               ([grid_png] if grid_png else []), out / "report.png")
    title = metrics.get("title", "Evaluation: aligned retriever vs the alternatives")
    verdict = "".join(f"<li>{html.escape(v)}</li>" for v in metrics.get("verdict", []))
    skipped = "".join(f"<li>{html.escape(s)}</li>" for s in metrics.get("skipped", []))
    notes = "".join(f"<li>{html.escape(s)}</li>" for s in metrics.get("notes", []))
    setup = html.escape(metrics.get("setup", ""))
    judge = judge if judge is not None else (
        out / JUDGE_DIR if (out / JUDGE_DIR / JUDGE_SUMMARY).is_file() else None)
    judge_part = judge_section(out, judge) if judge is not None else ""
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", f"<p class='note'>{setup}</p>",
             "<h2 id='verdict'>Verdict</h2>", f"<ul class='verdict'>{verdict}</ul>",
             "<h2 id='systems'>Systems</h2>", systems_table_html(metrics),
             "<p class='note'>Means with bootstrap 95% CIs over held-out queries (recall: over "
             "held-out captions). Green / red: the CI excludes 0. nDCG@10 (gain match &times; "
             "beauty) is the primary metric; aesthetic@10 averages over wrong-content results "
             "too and is a diagnostic only (docs/evaluation.md).</p>",
             "<h2 id='gallery'>Galleries</h2>", gallery_html(metrics),
             "<h2 id='hpir'>HPIR per aspect</h2>", hpir_html(metrics),
             "<h2 id='comparisons'>Comparisons</h2>", comparisons_table_html(metrics),
             pairwise_html(metrics),
             "<h2 id='plots'>Plots</h2>", f"<img src='{_png_uri(summary)}' style='width:100%'>",
             "<h2 id='frontier'>At equal relevance: the baselines' knobs swept</h2>",
             "<p class='note'>A cascade, a query shift, a query-time rephrase or the training "
             "teacher applied at query time (teacher_rerank) can always buy aesthetics with "
             "relevance. Each is swept over its knob; its best setting at least as relevant as "
             "the aligned model is chosen on validation queries and compared with the aligned "
             "model on the held-out test queries.</p>", teacher_rerank_html(metrics),
             (f"<img src='{_png_uri(frontier_png)}' style='width:100%'>" if frontier_png
              else ""), frontier_html(metrics),
             "<h2 id='teacher'>Teacher diagnostics</h2>", teacher_html(metrics.get("teacher", {})),
             "<h3>The rephrasing premise</h3>", premise_html(metrics.get("premise")),
             judge_part,
             "<h2 id='grids'>Top results</h2>",
             "<p class='note'>Each image: rank, oracle beauty and whether its content matches "
             "the query (red background: it does not).</p>"]
    parts += [grid_html(t, rows) for t, rows in grids]
    if skipped:
        parts += ["<h2 id='skipped'>Skipped</h2>", f"<ul>{skipped}</ul>"]
    if notes:
        parts += ["<h2 id='notes'>Notes</h2>", f"<ul>{notes}</ul>"]
    parts.append("</body></html>\n")
    page = out / "report.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return {"html": page, "png": out / "report.png", "summary": summary}


def summary_table(metrics: Mapping[str, Any]) -> str:
    """The compact before/after table printed to stdout."""
    k, primary = metrics["k"], metrics["primary"]
    lines = [f"{'system':<15} {'R@10':>6}  {primary + ' [95% CI]':<27} {'beauty|rel':>10} "
             f"{'prec@' + str(k):>7} {'HPIR-aes':>8} {'HPIR-acc':>8} {'aes@' + str(k) + '*':>7} "
             f"{'ms/q':>7}"]
    for name, s in metrics["systems"].items():
        r = (s.get("recall") or {}).get("r@10", {}).get("mean")
        p = s.get(f"precision@{k}", {}).get("mean")
        br = s.get(f"beauty_relevant@{k}", {}).get("mean")
        ha = ((s.get("hpir_aesthetics") or {}).get("oracle") or {}).get("mean")
        hc = ((s.get("hpir_accuracy") or {}).get("oracle") or {}).get("mean")
        a = s.get(f"aesthetic@{k}", {}).get("mean")
        lines.append(f"{name:<15} {_f(r):>6}  {fmt_ci(s.get(primary)):<27} {_f(br, '+.3f'):>10} "
                     f"{_f(p):>7} {_f(ha):>8} {_f(hc):>8} {_f(a, '+.3f'):>7} "
                     f"{s['timing']['ms_per_query']:7.2f}")
    if metrics.get("oracle", True):
        lines.append(f"* aes@{k}: mean beauty of every top-{k} result, wrong content included "
                     "(a diagnostic only); beauty|rel: mean beauty of the relevant ones")
    lines += ["", *metrics.get("verdict", [])]
    return "\n".join(lines)


def _f(x: Any, spec: str = ".3f") -> str:
    return f"{x:{spec}}" if _finite(x) else "n/a"
