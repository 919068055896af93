"""`channel_pruning`: remove whole filters, and everything that reads them, to get a narrower
dense model that is faster everywhere (no sparse kernels needed).

One concern per module:
- `groups`: which channels must go together (the channel groups), from one walk of the layer
  graph (`learners.topology`, whose layer-kind registry says how channels flow through a layer);
  `graph`: the result, with channel masks and the analytic FLOPs/params cost model;
- `nested`: a backbone used as one layer of the model, inlined for the analysis (the pruned
  model keeps it nested);
- `surgery`: the narrower Keras model, weights sliced;
- `counts`: the channel counts a group may keep and the greedy top-ups of a projection;
- `exchange`: the latency-aware re-rounding of a projected point;
- `latency_table`: per-layer TFLite latencies measured on this machine, and whole-model timing;
- `criteria`: which channels a group keeps (registered by name);
- `learner`: the `ChannelPruning` learner tying them together.

One preserve ratio per prunable group is the search space (`ratio/<group>`); FLOPs and params
of a point are computed analytically from the channel counts, latency is measured on TFLite
(cached per channel counts).

On a FLOPs or params target the projection is latency-aware (`latency_aware`, default on): the
counts that meet the target are re-rounded, each group within `exchange_range` of its projected
ratio, to the ones a per-layer latency table (every conv measured on its own on this machine at
the counts it may take, cached on disk) predicts to be fastest per MAC kept. Same target, same
search space; fewer of the saved FLOPs are ones XNNPACK cannot turn into time
(docs/benchmarks/channel_pruning.md).

Which channels a group keeps is decided by the `criterion`:
- `l1`, `l2`: norm of each producer's filter, summed over the group's producers.
- `reconstruction` (He et al. 2017): LASSO channel selection on the readers' outputs, then a
  least-squares refit of their kernels on the already-pruned network's features.
- `discrimination` (Zhuang et al. 2018): |activation x gradient| of the task loss plus the
  losses of auxiliary classifiers on intermediate feature maps.
"""
from pocketflow.learners.channel_pruning.learner import ChannelPruning  # noqa: F401  (registers)
