"""Federated learning of the default forecaster: what is shared, statistics, robust rounds.

Plain Python (numpy): no Kafka.  The edge (:mod:`streams.edge.federated`) and the
coordinator (:mod:`processors.apps.coordinator`) wire it to topics.  The modules:

- :mod:`~processors.federated.params`: a forecaster's family and shareable view
  (``family_of``, ``shared_view``, ``load_weights``);
- :mod:`~processors.federated.statistics`: least-squares row statistics and the solver
  (``RowStats``, ``solve_weights``, ``prior_covariance``);
- :mod:`~processors.federated.aggregation`: one round's updates -> the next version
  (``AggregationConfig``, ``aggregate``, ``merge_stats``, staleness and clipping rules);
- :mod:`~processors.federated.rounds`: round bookkeeping per family (``RoundCoordinator``);
- :mod:`~processors.federated.coldstart`: starting a new endpoint from the global model
  (``warm_start``, ``adopt_global``, ``ColdStartForecaster``);
- the values (``ModelDelta``, ``GlobalState``) and their Avro records:
  :mod:`schemas.federated`.

**Federated least squares.**  The default forecaster
(:class:`~processors.forecasting.direct.DirectForecaster`) predicts, per horizon, a
*scale-free* correction of the seasonal-naive forecast, linear in features divided by the
endpoint's level.  Its weights are a (recursive) least-squares fit, and least squares has
sufficient statistics: for rows ``z = (x, target)`` the sums ``S = sum z z^T`` (the
information matrix ``X^T X``, ``X^T y`` and ``y^T y``; ``x_0 = 1`` so ``S[0, 0]`` is the row
count).  Edges send the sums of their new rows; the coordinator adds them up and the global
weights are the ridge solution of the summed statistics,
``w_h = (S_xx + ridge I)^-1 S_xy`` - the same as least squares on all edges' rows in one
place, whatever way the rows are split between the edges (central *online* training, an
RLS that slowly forgets, lands close: 1.00-1.02x its test error in the benchmark).  Averaging
weights instead (FedAvg) is only exact when the edges' data look alike: on time-split
traces it was 1.3x central's test error (see ``benchmarks/federated.py``).  Rows are kept
apart by regime: ``gram`` from rows whose base was the seasonal-naive value (an endpoint
with a season of history: the model used from then on), ``cold_gram`` from rows made in an
endpoint's first season (base = the level; the edges' *shadow cold starts* produce them),
which give the ``cold_weights`` a new endpoint starts with.

==========================  =========  =====================================================
state                       where      why
==========================  =========  =====================================================
``gram``, ``cold_gram``     global     sums over >= ``min_rows`` rows of products of
(H x (F+1) x (F+1))                    scale-free features and targets (see Privacy)
``weights`` (H x F)         global     solved from ``gram``: per-horizon weights on the raw
                                       scale-free features
``cold_weights`` (H x F)    global     solved from ``cold_gram``: weights for an endpoint's
                                       first season, when no seasonal history exists yet
``cold_errors`` (H x C)     global     scale-free mean absolute error of each candidate of
                                       the online selector during (shadow) cold starts
``x_mean``, ``x_var``,      global     feature-scaler moments, ``"sgd"`` learner only: merged
``y_var`` (sgd)                        by pooling (counts, means, variances)
RLS covariance ``P``        local      the edge's own fit; a warm start sets it from the
                                       global statistics (see below)
level, value ring buffer,   local      they *are* the endpoint's traffic (raw values): they
EW means, seasonal diffs               never leave the edge
selector errors, band       local      per-endpoint accuracy; only their scale-free cold-start
error quantiles                        averages are shared (``cold_errors``)
==========================  =========  =====================================================

*Privacy.*  A statistic is a sum over at least ``min_rows`` rows (an edge holds fewer back
for a later round, see :class:`~streams.edge.federated.EdgeTrainingConfig`) of products
of features that are all divided by the endpoint's level: persistence, EW means, last
week's value *minus the seasonal-naive value, over the level*, time-of-day terms.  Neither
a request count, a rate, a latency nor the level itself is in it, and rows cannot be
recovered from the sums (a horizon's 351 distinct sums of >= 50 rows of ~16 unknowns
each).  On the wire each horizon is sent as a row
count (``num_samples``) with the means and covariance of the row values
(:func:`schemas.federated.update_to_record`), so even the count is not a value.
``noise_multiplier`` adds Gaussian noise to each round's aggregate (below) for a
differential-privacy budget.

*The RLS covariance stays local* (it is one edge's fit).  A warm-started endpoint's
``P`` comes from the global statistics: ``P = (k * G)^-1`` with ``G`` the mean information
matrix per row and ``k`` the prior's strength in samples (default one season): the global
weights count as much as a season of the endpoint's own data, strongly along directions
the federation's data pin down and weakly where they do not.

**Rounds, staleness, robustness.**  Round ``r`` produces version ``r``; an update for it
should be built on version ``r - 1``.  An update built on an older version (staleness
``s``) is *down-weighted* by ``staleness_decay ** s`` up to ``max_staleness`` and *rejected*
beyond (and always rejected when its base is newer than the coordinator's version).
For statistics each update is seen as a row count ``n`` and mean statistics ``G = S / n``:

* ``"fedavg"``: the sum of the updates' statistics (with no bound at all: the plain sum,
  no defence).  With clipping (the default, ``clip_median_multiple`` and/or ``clip_norm``)
  each ``G`` is pulled to within the bound of the global mean statistics so far (as a
  weight delta is clipped around the global weights; in the first round the round's
  coordinate-wise median) - *centred clipping*: honest edges are rarely touched, a poisoned
  one moves the sum by at most the bound, however large its update - and each count (the
  update's weight) is kept within ``[0, multiple x the round's median count]``.
  ``noise_multiplier`` adds symmetric Gaussian noise of ``noise_multiplier * bound *
  max_share`` to the round's mean statistics.
* ``"median"`` / ``"trimmed-mean"``: the same, but the centre is the coordinate-wise median
  / trimmed mean of the round's ``G`` (robust to one poisoned edge of several), and some
  bound always applies (1 x the median deviation if none is configured).  The centre only
  bounds the updates: taking the median of moment matrices as the aggregate itself was
  tried and is not least squares any more (1.22x central's test error on ELB).

Updates that carry weight deltas instead (``weights``; as older edges and tests send)
are averaged the FedAvg way: the mean of the deltas weighted by sample counts, each
clipped to an L2 norm bound, or coordinate-wise median / trimmed mean.  Once a family has
statistics its weights are always solved from them
(:func:`~processors.federated.aggregation.aggregate`).
"""
