"""`l1`, `l2`: the norm of each producer's filter, summed over the group's producers."""
from __future__ import annotations

import numpy as np

from pocketflow.learners.channel_pruning.counts import top_k
from pocketflow.learners.channel_pruning.criteria.base import kernel, pruned, register_criterion


def filter_norm(graph, model, group, order: int) -> np.ndarray:
    """L1/L2 norm of each output filter, summed over the group's producers."""
    score = np.zeros(group.size)
    for name in group.producers:
        k = np.abs(kernel(graph, model.get_layer(name)))
        # by channel of the group: a grouped conv holds channel j once in each of its blocks
        np.add.at(score, graph.lay_out[name].index, (k ** order).reshape(-1, k.shape[-1]).sum(0) ** (1.0 / order))
    return score


def _by_norm(order: int):
    def select(learner, model, graph, counts, data):
        return {g.id: top_k(filter_norm(graph, model, g, order), counts[g.id]) for g in pruned(graph, counts)}, {}, {}
    return select


register_criterion("l1")(_by_norm(1))
register_criterion("l2")(_by_norm(2))
