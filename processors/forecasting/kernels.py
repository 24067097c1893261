"""Compiled inner loops of the default forecaster (numba, ``nopython``).

A forecaster step works on (15 horizons x 25 features)-sized arrays, where numpy spends
more time entering each call than computing: the global trees' walk (then 100 trees x 15
rows x depth 6 dependent gathers) and the per-horizon RLS update were a third of a step.
Here they are plain loops compiled once per machine (``cache=True``: the machine code is
kept beside this file, so later processes load it in milliseconds).  They do the same
arithmetic as the numpy code they replaced, in another order, so results agree to the
last few bits, not bit for bit; they are deterministic, so snapshots still continue bit
for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

__all__ = ["compiled", "rls_update", "score_candidates", "walk_trees", "warm_up"]


def compiled(fn: Callable[..., Any]) -> Any:
    """``fn`` compiled by numba (``nopython``, releasing the GIL), its machine code cached
    on disk where numba can write one (beside the module, ``NUMBA_CACHE_DIR`` or the user's
    cache); where it can write none (a read-only install run by a user without a home),
    numba refuses ``cache=True`` at import, so it is compiled in each process instead.

    >>> ns: dict = {}
    >>> exec("def twice(x):\\n    return 2.0 * x", ns)  # no source file: no cache possible
    >>> compiled(ns["twice"])(1.5)
    3.0
    """
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True)(fn)


@compiled
def walk_trees(X: np.ndarray, roots: np.ndarray, feature: np.ndarray,
               threshold: np.ndarray, child: np.ndarray, value: np.ndarray,
               depth: int) -> np.ndarray:  # pragma: no cover - compiled
    """Sum over the trees of each row's leaf value (the layout of
    :class:`~processors.forecasting.trees.TreeEnsemble`: node ids doubled, a leaf its own
    children, so every walk takes ``depth`` steps).  Rows advance together tree by tree:
    their walks are independent, so the CPU overlaps their memory loads."""
    R = X.shape[0]
    out = np.zeros(R)
    node = np.empty(R, np.intp)
    for t in range(roots.shape[0]):
        for r in range(R):
            node[r] = roots[t]
        for _ in range(depth):
            for r in range(R):
                n = node[r]
                node[r] = child[n + (X[r, feature[n]] > threshold[n])]
        for r in range(R):
            out[r] += value[node[r]]
    return out


@compiled
def rls_update(W: np.ndarray, P: np.ndarray, hi: np.ndarray, X: np.ndarray,
               tgt: np.ndarray, res_var: np.ndarray, n_upd: np.ndarray, lam: float,
               cap: float) -> None:  # pragma: no cover - compiled
    """One exponentially-forgetting RLS step, in place, for the horizons ``hi``: rows ``k``
    of ``X`` (features) and ``tgt`` (targets) update ``W[hi[k]]`` and ``P[hi[k]]``.  The
    innovation is clipped at 3 running residual standard deviations once a horizon has
    50 updates; a covariance whose trace passes ``cap`` is scaled back to it."""
    F = X.shape[1]
    Px = np.empty(F)
    for k in range(hi.shape[0]):
        h = hi[k]
        err = tgt[k]
        for f in range(F):
            err -= X[k, f] * W[h, f]
        rv = res_var[h]
        sd3 = 3.0 * np.sqrt(rv)
        e_c = min(max(err, -sd3), sd3) if n_upd[h] > 50 else err
        res_var[h] = rv + 0.01 * (min(err * err, 9.0 * rv + 1e-6) - rv)
        denom = lam
        for i in range(F):
            s = 0.0
            for j in range(F):
                s += P[h, i, j] * X[k, j]
            Px[i] = s
            denom += X[k, i] * s
        for i in range(F):
            W[h, i] += Px[i] / denom * e_c
        tr = 0.0
        for i in range(F):
            ki = Px[i] / denom
            for j in range(F):
                P[h, i, j] = (P[h, i, j] - ki * Px[j]) / lam
            tr += P[h, i, i]
        if tr > cap:
            sc = cap / tr
            for i in range(F):
                for j in range(F):
                    P[h, i, j] *= sc


@compiled
def score_candidates(hi: np.ndarray, rws: np.ndarray, cands: np.ndarray, value: float,
                     s: np.ndarray, cerr_num: np.ndarray, cerr_w: np.ndarray,
                     cerr_n: np.ndarray, cerr: np.ndarray, warm: int, keep: float,
                     mix: bool, pmix: np.ndarray, gerr: np.ndarray, guard_a: float,
                     mixw: np.ndarray, mix_lr: float, mix_power: float, mix_share: float,
                     fclip: float) -> None:  # pragma: no cover - compiled
    """Score the candidate forecasts ``cands`` (row ``k``: horizon ``hi[k]``, made at
    pending row ``rws[k]`` with level ``s[k]``) against ``value``, in place: the
    bias-corrected EW mean of each candidate's scale-free absolute error, and with
    ``mix`` the guard's errors and an exponentiated-gradient step of the blend's weights
    (see :class:`~processors.forecasting.blend.CandidateBlend`)."""
    big = np.finfo(np.float64).max
    C = cands.shape[1]
    g = np.empty(C)
    ok = np.empty(C, np.bool_)
    for k in range(hi.shape[0]):
        h = hi[k]
        sk = s[k]
        for c in range(C):
            e = abs(value - cands[k, c]) / sk
            if not np.isnan(e):
                cerr_num[h, c] = cerr_num[h, c] * keep + min(e, big)
                cerr_w[h, c] = cerr_w[h, c] * keep + 1.0
                cerr_n[h, c] += 1
            if cerr_n[h, c] >= warm:
                cerr[h, c] = cerr_num[h, c] / max(cerr_w[h, c], 1e-12)
            else:
                cerr[h, c] = np.nan
        if not mix:
            continue
        pred = pmix[rws[k], h]
        for j in range(3):
            x = pred if j == 0 else cands[k, j]
            ge = abs(x - value) / sk
            if not np.isnan(ge):
                gerr[h, j] += guard_a * (min(ge, fclip) - gerr[h, j])
        # d|sum_c w_c x_c / sum_c w_c - y| / dw_c ~ sign(pred - y) (x_c - y) / level.
        sgn = np.sign(pred - value)
        wa_sum, wg_sum = 0.0, 0.0
        for c in range(C):
            gc = sgn * (cands[k, c] - value) / sk
            ok[c] = not np.isnan(cands[k, c]) and np.isfinite(gc)
            if ok[c]:
                gc = min(max(gc, -fclip), fclip)
                wa_sum += mixw[h, c]
                wg_sum += mixw[h, c] * gc
            g[c] = gc
        # A candidate without a forecast takes the blend's mean gradient: it keeps its
        # weight relative to the blend.
        gm = wg_sum / max(wa_sum, 1e-300)
        lr = mix_lr / (h + 1.0) ** mix_power
        tot = 0.0
        for c in range(C):
            gc = g[c] if ok[c] else gm
            if np.isnan(pred):
                gc = 0.0
            g[c] = mixw[h, c] * np.exp(-lr * gc)
            tot += g[c]
        for c in range(C):
            mixw[h, c] = (1.0 - mix_share) * (g[c] / tot) + mix_share / C


def warm_up() -> None:
    """Compile (first run on a machine, about a second) or load (later runs, milliseconds)
    every kernel for the argument types the forecaster passes, so that cost falls at
    start-up and not on the first records (nor inside a measurement).

    >>> warm_up()
    """
    f8, ip, i8 = np.float64, np.intp, np.int64
    H, F, C = 2, 3, 4
    hi = np.arange(H, dtype=ip)
    X = np.ones((H, F), dtype=f8)
    walk_trees(X, np.zeros(1, dtype=ip), np.zeros(2, dtype=ip), np.full(2, np.inf),
               np.zeros(2, dtype=ip), np.zeros(2, dtype=f8), 1)
    rls_update(np.zeros((H, F)), np.ones((H, F, F)), hi, X, np.ones(H), np.ones(H),
               np.zeros(H, dtype=i8), 0.999, 30.0)
    score_candidates(hi, hi, np.ones((H, C)), 1.0, np.ones(H), np.zeros((H, C)),
                     np.zeros((H, C)), np.zeros((H, C), dtype=i8), np.zeros((H, C)), 1, 0.9,
                     True, np.ones((H, H)), np.zeros((H, 3)), 0.1, np.full((H, C), 1 / C),
                     0.5, 0.5, 1e-5, 10.0)
