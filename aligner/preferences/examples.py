"""Example images of a preference build, for people to look at: ``grids.png`` (each query's
u x v grid: rows = similarity to the query, columns = the teacher's order) and ``degraded.png``
(one image and its degraded copies)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from aligner.preferences.pairs import PairSettings, Pool

log = logging.getLogger(__name__)


def draw_examples(pools: list[Pool], settings: PairSettings, corpus: str, out: Path, n: int) -> list[str]:
    """``grids.png`` (the u x v grid of ``n`` queries) and ``degraded.png``; returns the files
    written (none when the corpus cannot be read)."""
    from PIL import Image

    from aligner.data.corpus import fetch_images
    from aligner.preferences.degrade import degraded_id, resolve_images
    from aligner.preferences.grid import fit_grid, sample_grid
    from aligner.runtime.grids import rows_grid_png

    full = (settings.u, settings.v, settings.stride)
    chosen = [p for p in pools if p.ids and fit_grid(len(p.ids), *full) == full][:n]
    if not chosen:
        return []
    grids = [(p, sample_grid(p.sem, p.aes, fit_grid(len(p.ids), *full))) for p in chosen]
    ids = [p.ids[c] for p, cells in grids for c in cells.reshape(-1)]
    images = fetch_images(corpus, ids)
    if not images:
        log.warning("no example images found in %s: skipping the PNGs", corpus)
        return []
    rows = []
    for p, cells in grids:
        for i, row in enumerate(cells):
            label = f"{p.query} | semantic row {i}" if i == 0 else f"semantic row {i}"
            rows.append((label, [{"image": images.get(p.ids[c]), "score": float(p.sem[c]),
                                  "aesthetic": float(p.aes[c]), "label": f"r{i}c{j} {p.ids[c]}"}
                                 for j, c in enumerate(row)]))
    written = [rows_grid_png(rows, out / "grids.png", title=(
        f"grid {settings.u}x{settings.v} stride {settings.stride}: rows = similarity to the "
        f"query, columns = teacher {settings.teacher} (best first)")).name]
    if settings.degraded:
        top = chosen[0].ids[int(np.argmax(chosen[0].sem))]
        kinds = list(dict.fromkeys(settings.degrade_kinds))
        dids = [degraded_id(top, k, settings.degrade_strengths[k]) for k in kinds]
        pix = resolve_images(corpus, [top, *dids])
        if top in pix:
            items = [{"image": Image.fromarray(pix[i]), "label": lab}
                     for i, lab in zip([top, *dids], ["original", *kinds], strict=True)]
            written.append(rows_grid_png([(top, items)], out / "degraded.png",
                                         title="degraded copies (rejected)").name)
    return written


