"""The order-consistent pairwise judge, re-exported from :mod:`aligner.judge` (its home since
the LMM judge arrived; kept so existing imports keep working)."""

from aligner.judge.protocol import ASPECTS, Judgment, Side, combine_orders, order_consistent, swap
from aligner.judge.proxy import ProxyJudge, RowView, diversity

__all__ = ["ASPECTS", "Judgment", "ProxyJudge", "RowView", "Side", "combine_orders",
           "diversity", "order_consistent", "swap"]
