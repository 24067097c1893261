"""The worker's global trees refit: the one part of them that runs beside the stream.

The bookkeeping is plain Python (``SharedTrees`` in
:mod:`processors.forecasting.global_trees`, :mod:`processors.treelog`); here the fit is
sent to a thread so the event loop keeps consuming while LightGBM trains.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from processors.engine import Engine

log = logging.getLogger(__name__)


async def refit_trees(engine: Engine, executor: ThreadPoolExecutor) -> bool:
    """Refit the engine's global trees if due: the pool is copied here, the fit runs on
    ``executor`` (one thread: one refit at a time) while the stream goes on, and the new
    trees go to every model (and to endpoints created later).  Returns whether new trees
    were installed."""
    trees = engine.trees
    if trees is None:
        return False
    trees.thin(engine.endpoints())
    fit = trees.take() if trees.due() else None
    if fit is None:
        return False
    started = time.perf_counter()
    try:
        model = await asyncio.get_running_loop().run_in_executor(executor, fit)
    except Exception:
        trees.failed()
        log.exception("global trees: refit on %d rows failed (the current trees stay)",
                      fit.rows)
        return False
    model = trees.fitted(model)
    n = engine.treelog.share(model)
    log.info("global trees v%d fitted on %d rows in %.2f s (%d trees, %d KB), given to %d "
             "models", model.version, fit.rows, time.perf_counter() - started, model.n_trees,
             model.nbytes // 1024, n)
    return True
