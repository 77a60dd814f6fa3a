"""Which state the preference fine-tune outputs: early stopping, WiSE-FT or the last step.

Every rule validates on held-out queries' teacher pairs and held-out captions and never reads
the oracle. :func:`better` compares two validated states; :class:`Selection` keeps the
selected one during a run (rank 0) and writes it as ``best/`` in each checkpoint.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from aligner.training.loop import fmt

log = logging.getLogger(__name__)
BEST_DIR = "best"

_WITHIN = ("whose val_r@10 is within recall_tolerance + recall_z standard errors (paired, "
           "over the validation captions) of the starting model's")
SELECTED_BY = {
    "early_stopping": f"the validated step with the largest val_pair_margin among those {_WITHIN}",
    "wise": "the weight-space interpolation start + alpha * (final - start) with the largest "
            f"val_pair_margin among those {_WITHIN}",
    "last": "the last step",
}
SE_KEY = "val_r@10_drop_se"


def recall_within(m: dict, start: dict, tolerance: float, z: float = 0.0) -> bool:
    """Is the validation recall@10 of ``m`` within the recall budget of ``start``?

    The budget is ``tolerance + z * se``, ``se`` the paired standard error of the drop
    (``m[SE_KEY]``, 0 when unknown). A measured drop smaller than its own noise is no evidence
    of a regression: with 500 validation captions one caption is 0.2 points and the SE of a
    drop between two close models is about a point, so a fixed 1-point tolerance alone
    rejects states that lost nothing. ``z = 0`` is the fixed tolerance alone.
    """
    slack = tolerance + z * float(m.get(SE_KEY, 0.0))
    return m.get("val_r@10", 1.0) >= start.get("val_r@10", 0.0) - slack - 1e-9


def better(candidate: dict, best: dict | None, start: dict, tolerance: float,
           z: float = 0.0) -> bool:
    """Selection rule (never reads the oracle): spend the recall budget on the teacher.

    Among states whose validation recall@10 is within the budget of the starting model's
    (:func:`recall_within`: ``tolerance`` plus ``z`` paired standard errors), the one that
    moved furthest towards the teacher on held-out queries wins: the largest mean implicit
    reward margin ``z`` on the validation pairs (lower held-out DPO loss breaks ties). The
    held-out DPO loss itself is a poor guide here: with a noisy teacher (a quarter of the grid
    pairs disagree with the hidden human on the built-in world) it is lowest for small moves,
    whatever they buy. A state beyond the budget is never selected while one within it
    exists; among those beyond it, and without validation pairs, the highest validation
    recall@10 wins.
    """
    def ok(m: dict) -> bool:
        return recall_within(m, start, tolerance, z)

    if best is None:
        return True
    if ok(candidate) != ok(best):
        return ok(candidate)
    if ok(candidate) and "val_pair_margin" in candidate:
        return (candidate["val_pair_margin"], -candidate.get("val_pair_loss", 0.0)) > (
            best.get("val_pair_margin", -float("inf")), -best.get("val_pair_loss", 0.0))
    return candidate.get("val_r@10", 0.0) > best.get("val_r@10", 0.0)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state dict without the packaged, frozen text transformer."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not k.startswith("text.transformer")}


def interpolate_states(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                       alpha: float) -> dict[str, torch.Tensor]:
    """``start + alpha * (end - start)`` for floating tensors (WiSE-FT, Wortsman et al. 2022);
    other tensors (counters, ids) are taken from ``end``."""
    return {k: (start[k] + alpha * (v - start[k])) if v.is_floating_point() and k in start
            else v.clone() for k, v in end.items()}


def wise_select(model: torch.nn.Module, start_state: dict, alphas: Iterable[float],
                validate_fn: Callable[[], dict], start_metrics: dict, tolerance: float,
                step: int, z: float = 0.0):
    """Validate the weight-space interpolations between the start and the fine-tuned model and
    pick one with :func:`better` (never the oracle). The model keeps its final weights.

    Returns:
        (selected validation metrics with ``alpha`` and ``step``, its state dict, one row of
        metrics per alpha).
    """
    final = trainable_state(model)
    rows, best, best_state = [], None, None
    try:
        for alpha in sorted({float(a) for a in alphas}):
            state = interpolate_states(start_state, final, alpha)
            model.load_state_dict(state, strict=False)
            m = {"alpha": alpha, "step": step, **validate_fn()}
            rows.append(m)
            log.info("weight interpolation alpha %.2f: %s", alpha, fmt(m))
            if better(m, best, start_metrics, tolerance, z):
                best, best_state = m, state
    finally:
        model.load_state_dict(final, strict=False)
    return best, best_state, rows


def _val_part(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("val_") or k == "step"}


class Selection:
    """The selected state of one run (rank 0), by ``rule``.

    ``early_stopping``: the best validated step by :func:`better`; ``wise``: at the last step,
    the best of the interpolations ``start + alpha * (final - start)`` over ``alphas``;
    ``last``: the last step. Construct it before the model trains (``wise`` keeps the start).
    """

    def __init__(self, model: torch.nn.Module, rule: str, alphas: list[float],
                 tolerance: float, validate_fn: Callable[[], dict], z: float = 0.0) -> None:
        if rule not in SELECTED_BY:
            raise ValueError(f"selection must be one of {sorted(SELECTED_BY)}, got {rule!r}")
        self.model, self.rule, self.alphas, self.tolerance = model, rule, alphas, tolerance
        self.z = z
        self.validate_fn = validate_fn
        self.start_state = trainable_state(model) if rule == "wise" else None  # theta_0
        self.start_metrics: dict | None = None
        self.start_hits: Any = None  # the start's per-caption recall@10 outcomes (paired SE)
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.rows: list[dict] = []

    def update(self, metrics: dict, evaluated: bool, last: bool) -> None:
        """After a logged step's metrics (with validation when ``evaluated``) are known."""
        start = self.start_metrics or {}
        if evaluated and self.rule == "early_stopping" and better(metrics, self.best, start,
                                                                  self.tolerance, self.z):
            self.best, self.best_state = _val_part(metrics), trainable_state(self.model)
        if last and self.rule == "wise":
            self.best, self.best_state, self.rows = wise_select(
                self.model, self.start_state, self.alphas, self.validate_fn, start,
                self.tolerance, metrics["step"], self.z)
        elif last and self.rule == "last":
            self.best, self.best_state = _val_part(metrics), trainable_state(self.model)

    def state(self) -> dict[str, Any]:
        """What a resumed run needs back (saved in the train state)."""
        return {"start_metrics": self.start_metrics, "best": self.best,
                "best_state": self.best_state, "start_hits": self.start_hits}

    def restore(self, extra: dict[str, Any]) -> None:
        self.start_metrics = extra.get("start_metrics")
        self.start_hits = extra.get("start_hits")
        self.best, self.best_state = extra.get("best"), extra.get("best_state")

    def save(self, directory: Path, write: Callable[..., None]) -> None:
        """The selected state as a checkpoint in ``directory / best`` (nothing before one)."""
        if self.best_state is None:
            return
        m = copy.deepcopy(self.model).cpu()
        m.load_state_dict(self.best_state, strict=False)
        write(m, directory / BEST_DIR, step=self.best["step"],
              alpha=self.best.get("alpha", 1.0), selected_by=SELECTED_BY[self.rule],
              recall_budget={"tolerance": self.tolerance, "z": self.z},
              val=self.best, interpolations=self.rows, start=self.start_metrics)
