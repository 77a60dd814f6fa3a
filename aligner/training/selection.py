"""Which state the preference fine-tune outputs: WiSE-FT, early stopping, the last step, or a
fixed interpolation.

Every rule that chooses validates on held-out queries' teacher pairs and held-out captions and
never reads the oracle. A state is eligible when it passes a **non-inferiority test** on
validation caption recall@10 (``docs/evaluation.md`` §4): the upper one-sided bound of its
paired drop vs the start,

    (start val_r@10 - val_r@10) + recall_z * SE  <=  recall_margin,

with ``SE`` the paired standard error of the drop over the validation captions
(``val_r@10_drop_se``, :func:`aligner.retrieval.metrics.paired_drop_se`). A noisier state
needs a smaller measured drop to pass, never a larger one (:func:`noninferior` is monotone in
the drop and in ``SE``). Among the states that pass, the largest held-out reward margin
(``val_pair_margin``) wins and the lower held-out pair loss breaks ties (:func:`better`). The
start itself (alpha 0, step 0) has drop 0 and SE 0, so it always passes and is always a
candidate: a run that cannot show non-inferiority outputs the start.

Rules (:class:`Selection`): ``wise`` (default) tries ``start + alpha (final - start)`` for alpha
0 and every ``wise_alphas`` at the last step; ``early_stopping`` the start and every validated
step; ``last`` the last step (no test); ``fixed`` the one interpolation ``wise_alphas[0]`` with
no test (the contrastive-only control at the aligned model's alpha: the same move, not one the
control's own validation chose). The selected state goes into each checkpoint as ``best/``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aligner.training.loop import fmt

log = logging.getLogger(__name__)
BEST_DIR = "best"
SE_KEY = "val_r@10_drop_se"
#: what a validated state's row adds: the drop's upper bound and whether it passed the test
BOUND_KEY, PASS_KEY = "val_r@10_drop_bound", "noninferior"
NOTHING_PASSED = "no interpolation passed the non-inferiority test: the output is the start"

_TEST = ("that pass the non-inferiority test on validation recall@10 (drop vs the start + "
         "recall_z paired standard errors <= recall_margin)")
SELECTED_BY = {
    "early_stopping": "the validated step (the start, step 0, included) with the largest "
                      f"val_pair_margin among those {_TEST}",
    "wise": "the weight-space interpolation start + alpha * (final - start) (alpha 0, the start, "
            f"included) with the largest val_pair_margin among those {_TEST}",
    "last": "the last step",
    "fixed": "the weight-space interpolation start + alpha * (final - start) at the one given "
             "alpha, without a test (a control trained like a selected model)",
}


def drop_se(m: dict) -> float | None:
    """The paired SE of ``m``'s validation recall@10 drop; None when unknown (or not finite)."""
    se = m.get(SE_KEY)
    return float(se) if se is not None and math.isfinite(se) else None


def recall_drop_bound(m: dict, start: dict, z: float) -> float:
    """Upper bound of the validation recall@10 drop of ``m`` vs ``start``: ``drop + z * SE``.

    The drop is 0 when either recall is unknown (no validation captions: nothing to test) and an
    unknown SE counts as 0 (the point estimate alone; :class:`Selection` warns once).
    """
    drop = 0.0
    if "val_r@10" in m and "val_r@10" in start:
        drop = float(start["val_r@10"]) - float(m["val_r@10"])
    return drop + z * (drop_se(m) or 0.0)


def noninferior(m: dict, start: dict, margin: float, z: float) -> bool:
    """Does ``m`` pass the non-inferiority test: ``drop + z * SE <= margin``?"""
    return recall_drop_bound(m, start, z) <= margin + 1e-9


def better(candidate: dict, best: dict | None, start: dict, margin: float, z: float) -> bool:
    """Selection rule (never reads the oracle): is ``candidate`` preferred to ``best``?

    A state that passes the non-inferiority test (:func:`noninferior`) always beats one that
    fails. Among passing states the one that moved furthest towards the teacher on held-out
    queries wins: the largest mean implicit reward margin on the validation pairs
    (``val_pair_margin``; the lower held-out DPO loss breaks ties). The held-out DPO loss itself
    is a poor guide here: with a noisy teacher it is lowest for small moves, whatever they buy.
    Without validation pairs, and among failing states (only before the start is known), the
    higher validation recall@10 wins.
    """
    if best is None:
        return True
    ok, ok_best = noninferior(candidate, start, margin, z), noninferior(best, start, margin, z)
    if ok != ok_best:
        return ok
    if ok and "val_pair_margin" in candidate:
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


def _val_part(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("val_") or k == "step"}


def start_row(start_metrics: dict, step: int) -> dict:
    """The start's validated row (alpha 0): its own metrics, drop 0 and SE 0 by definition."""
    return {**_val_part(start_metrics), "alpha": 0.0, "step": step, SE_KEY: 0.0}


class Selection:
    """The selected state of one run (rank 0), by ``rule`` (see the module docstring).

    Construct it before the model trains: it keeps the start's trainable state (theta_0) for
    every rule but ``last``. :meth:`set_start` gives it the start's validation (the reference of
    the test); :meth:`update` sees every logged step.

    Args:
        model: the model being trained (its current weights are the start).
        rule: ``wise`` | ``early_stopping`` | ``last`` | ``fixed``.
        alphas: ``wise``: the interpolation weights tried besides 0; ``fixed``: the one used.
        validate_fn: validates the model's current weights (held-out pairs and captions).
        margin: the non-inferiority margin of validation recall@10 (``recall_margin``).
        z: standard errors added to the drop (``recall_z``; 1.645: one-sided 95%).
    """

    def __init__(self, model: torch.nn.Module, rule: str, alphas: list[float],
                 validate_fn: Callable[[], dict], *, margin: float, z: float) -> None:
        if rule not in SELECTED_BY:
            raise ValueError(f"selection must be one of {sorted(SELECTED_BY)}, got {rule!r}")
        if rule == "fixed" and len(alphas) != 1:
            raise ValueError(f"selection=fixed takes exactly one alpha, got {alphas}")
        self.model, self.rule, self.alphas = model, rule, [float(a) for a in alphas]
        self.margin, self.z = margin, z
        self.validate_fn = validate_fn
        self.start_state = trainable_state(model) if rule != "last" else None  # theta_0
        self.start_metrics: dict | None = None
        self.start_hits: Any = None  # the start's per-caption recall@10 outcomes (paired SE)
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.rows: list[dict] = []
        self._warned_se = False

    def set_start(self, metrics: dict, hits: Any) -> None:
        """The start's validation (step 0) and per-caption hits; ``early_stopping`` begins with
        the start as its selected state (it always passes)."""
        self.start_metrics, self.start_hits = metrics, hits
        if self.rule == "early_stopping" and self.best is None and self.start_state is not None:
            self.best, self.best_state = start_row(metrics, 0), self.start_state

    def passes(self, m: dict) -> bool:
        """:func:`noninferior` against the start (warns once when the SE is unknown)."""
        if "val_r@10" in m and drop_se(m) is None and not self._warned_se:
            self._warned_se = True
            log.warning("validation recall@10 without a paired standard error (the start's "
                        "per-caption hits are unknown): the non-inferiority test uses SE 0, "
                        "the measured drop alone")
        return noninferior(m, self.start_metrics or {}, self.margin, self.z)

    def _better(self, m: dict) -> bool:
        self.passes(m)  # the SE warning
        return better(m, self.best, self.start_metrics or {}, self.margin, self.z)

    def _annotate(self, m: dict) -> dict:
        """``m`` with the drop's upper bound and the test's outcome (for logs and metrics)."""
        return {**m, BOUND_KEY: recall_drop_bound(m, self.start_metrics or {}, self.z),
                PASS_KEY: self.passes(m)}

    def _interpolation(self, alpha: float, final: dict, step: int) -> tuple[dict, dict]:
        """The validated row and the state of ``start + alpha (final - start)``. Alpha 0 is the
        start: its state is theta_0 itself and its row the start's validation when known."""
        assert self.start_state is not None
        if alpha == 0.0:
            state = self.start_state
            if self.start_metrics:
                return start_row(self.start_metrics, step), state
        else:
            state = interpolate_states(self.start_state, final, alpha)
        self.model.load_state_dict(state, strict=False)
        m = {"alpha": alpha, "step": step, **self.validate_fn()}
        if alpha == 0.0:
            m[SE_KEY] = 0.0
        return m, state

    def wise(self, step: int) -> None:
        """Validate the interpolations for alpha 0 and ``alphas`` and keep the best by
        :func:`better` (the start always passes). The model keeps its final weights."""
        final = trainable_state(self.model)
        self.best, self.best_state, self.rows = None, None, []
        try:
            for alpha in sorted({0.0, *self.alphas}):
                m, state = self._interpolation(alpha, final, step)
                m = self._annotate(m)
                self.rows.append(m)
                log.info("weight interpolation alpha %.2f: recall@10 drop bound %.4f vs margin "
                         "%.4f (%s) %s", alpha, m[BOUND_KEY], self.margin,
                         "passes" if m[PASS_KEY] else "fails", fmt(m))
                if self._better(m):
                    self.best, self.best_state = m, state
        finally:
            self.model.load_state_dict(final, strict=False)
        if self.best is not None and self.best["alpha"] == 0.0 and len(self.rows) > 1:
            if not any(r[PASS_KEY] for r in self.rows if r["alpha"] > 0):
                log.warning(NOTHING_PASSED)
            else:
                log.warning("the start (alpha 0) has the largest validation reward margin among "
                            "the interpolations that pass the non-inferiority test: the output "
                            "is the start")

    def fixed(self, step: int) -> None:
        """The one interpolation ``alphas[0]``, validated for the record but not tested."""
        final = trainable_state(self.model)
        try:
            m, state = self._interpolation(self.alphas[0], final, step)
        finally:
            self.model.load_state_dict(final, strict=False)
        self.best, self.best_state, self.rows = m, state, [m]
        log.info("fixed weight interpolation alpha %.2f: %s", self.alphas[0], fmt(m))

    def update(self, metrics: dict, evaluated: bool, last: bool) -> None:
        """After a logged step's metrics (with validation when ``evaluated``) are known."""
        if evaluated and self.rule == "early_stopping" and self._better(metrics):
            self.best, self.best_state = _val_part(metrics), trainable_state(self.model)
        if last and self.rule == "wise":
            self.wise(metrics["step"])
        elif last and self.rule == "fixed":
            self.fixed(metrics["step"])
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
        if self.best_state is None or self.best is None:
            return
        m = copy.deepcopy(self.model).cpu()
        m.load_state_dict(self.best_state, strict=False)
        write(m, directory / BEST_DIR, step=self.best["step"],
              alpha=self.best.get("alpha", 1.0), selected_by=SELECTED_BY[self.rule],
              noninferiority={"margin": self.margin, "z": self.z},
              val=self.best, interpolations=self.rows, start=self.start_metrics)

