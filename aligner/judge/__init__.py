"""Judges and annotators: the order-consistent pairwise row judge (LMM back ends and proxies,
named as such) and VisionPrefer-style per-aspect annotation.

* :mod:`aligner.judge.protocol` - judging in both orders; a win counts only when they agree;
* :mod:`aligner.judge.proxy` - proxy judges (``proxy:scorer+similarity``, ``proxy:reward``);
* :mod:`aligner.judge.backend` - the VLM back-end interface (``openai``, ``transformers``,
  ``vllm``) and reading a choice from log-probabilities;
* :mod:`aligner.judge.lmm` - the LMM judge (``<ranker>`` and ``<scorer>`` prompts);
* :mod:`aligner.judge.prompts` - versioned prompt files (``prompts/*.yaml``);
* :mod:`aligner.judge.rows` - judging rows of corpus ids (the job and the serving deployment);
* :mod:`aligner.judge.summary` - win rates with bootstrap CIs over queries;
* :mod:`aligner.judge.annotate` - ratings per aspect and the preference pairs they give;
* :mod:`aligner.judge.run`, :mod:`aligner.judge.annotate_run` - the two jobs.

Importing this package loads no model and no torch.
"""

from aligner.judge.protocol import (
    ASPECTS,
    Judgment,
    Side,
    combine_orders,
    order_consistent,
    swap,
)
from aligner.judge.proxy import ProxyJudge, RewardProxyJudge, RowView, diversity

__all__ = ["ASPECTS", "Judgment", "ProxyJudge", "RewardProxyJudge", "RowView", "Side",
           "combine_orders", "diversity", "order_consistent", "swap"]
