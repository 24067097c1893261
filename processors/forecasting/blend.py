"""The default forecaster's final forecast from its candidates (see
:mod:`processors.forecasting.direct`, ``select``).

:class:`CandidateBlend` scores every candidate forecast (the model, seasonal naive,
persistence, the EW means, the long-season naive, the multi-season mean) when its actual
arrives, and combines them: ``"mix"`` (online exponentiated-gradient blend with a fixed
share and a guard), ``"best"`` (smallest recent error), ``"model"`` or ``"blend"``
(inverse-squared-error weights).  A mixin of
:class:`~processors.forecasting.direct.DirectForecaster`: the state lives in the
forecaster's own attributes, so snapshots keep their layout.
"""

from __future__ import annotations

import numpy as np

from processors.forecasting.features import FCLIP
from processors.forecasting.kernels import score_candidates

__all__ = ["CANDIDATES", "MIX_LR", "MIX_POWER", "MIX_SHARE", "SELECTS", "CandidateBlend"]

_MAX = float(np.finfo(np.float64).max)  # what np.nan_to_num turns +inf into

#: Candidate forecasts the selector chooses between, in column order.
CANDIDATES = ("model", "seasonal_naive", "persistence", "ew_fast", "ew_mid", "ew_slow",
              "long_season_naive", "multi_season_mean", "global_trees")
#: How the final forecast is made from the candidates (see :class:`DirectForecaster`).
SELECTS = ("mix", "best", "model", "blend")
#: Learning rate and fixed share of the online blend (select="mix"); picked on the two
#: traces in streams/traces, the same ones the accuracy benchmark reports.
MIX_LR = 0.5
MIX_SHARE = 1e-5
#: The blend's rate at horizon h is ``mix_lr / h ** MIX_POWER`` (0.5 since the global trees:
#: 1/h was too slow at h = 15 to weigh the trees up on NYC taxi, and a larger mix_lr too
#: fast at h = 1 on ELB).
MIX_POWER = 0.5
#: Share of the blend's starting weight on the base forecast (column 1).
INIT_BASE_SHARE = 0.5


class CandidateBlend:
    """Candidate errors, the online blend and the guard (a mixin)."""

    # Set by BandedForecaster.
    max_horizon: int
    _t: int
    _hs: np.ndarray
    # Set by _init_selector.
    select: str
    guard_margin: float
    mix_lr: float
    mix_share: float
    #: Snapshots from before the option learned at rate mix_lr / h: 1.0 keeps them so.
    mix_power: float = 1.0
    _err_a: float
    _cerr: np.ndarray
    _cerr_num: np.ndarray
    _cerr_w: np.ndarray
    _cerr_n: np.ndarray
    _warm: int
    _chosen: np.ndarray
    _mixw: np.ndarray
    _pmix: np.ndarray
    _gerr: np.ndarray
    _guard_a: float
    _rows_h: np.ndarray

    def _init_selector(self, select: str, guard_margin: float, mix_lr: float,
                       mix_share: float, error_halflife: int | None,
                       guard_halflife: int | None, season: int,
                       mix_power: float = MIX_POWER) -> None:
        H, C, m = self.max_horizon, len(CANDIDATES), season
        self.select = select
        self.guard_margin = float(guard_margin)
        self.mix_lr = float(mix_lr)
        self.mix_share = float(mix_share)
        self.mix_power = float(mix_power)
        hl = error_halflife if error_halflife else min(max(m, 50), 2000)
        self._err_a = 1.0 - 0.5 ** (1.0 / hl)
        self._cerr = np.full((H, C), np.nan)  # EW mean |error| / level, per candidate
        self._cerr_num = np.zeros((H, C))
        self._cerr_w = np.zeros((H, C))
        self._cerr_n = np.zeros((H, C), dtype=np.int64)
        self._warm = min(hl, 100)  # errors a candidate needs before it can be chosen
        self._chosen = np.zeros(H, dtype=np.int64)
        # Online blend (select="mix"): weights per horizon over the candidates, and the
        # blended forecast made at step k (row k % H) to score it when the actual arrives.
        # With no record yet the blend starts half on the base (seasonal naive, as "best"
        # does), half uniform: uniform alone mixed the EW means and persistence into a
        # new endpoint's long horizons (NYC taxi h = 15: 0.494 against 0.501, with the
        # first season not scored; ELB within 0.003 either way).
        self._mixw = np.full((H, C), (1.0 - INIT_BASE_SHARE) / C)
        self._mixw[:, 1] += INIT_BASE_SHARE
        self._pmix = np.full((H, H), np.nan)
        # EW mean |error| / level of the blend, seasonal naive, persistence (the guard).
        self._gerr = np.zeros((H, 3))
        self._guard_a = 1.0 - 0.5 ** (1.0 / (guard_halflife or max(m // 2, 12)))

    def _add_candidate_columns(self) -> None:
        """Widen a snapshot made with fewer candidates (before ``global_trees``) to
        :data:`CANDIDATES`: the new columns have no forecast, no error record and the
        row's mean blend weight (a candidate without a forecast leaves the blend as it
        is)."""
        k = len(CANDIDATES) - self._mixw.shape[1]
        if k <= 0:
            return

        def pad(a: np.ndarray, fill: float) -> np.ndarray:
            extra = np.full((*a.shape[:-1], k), fill, dtype=a.dtype)
            return np.concatenate([a, extra], axis=-1)

        self._cerr = pad(self._cerr, np.nan)
        self._cerr_num, self._cerr_w = pad(self._cerr_num, 0.0), pad(self._cerr_w, 0.0)
        self._cerr_n = pad(self._cerr_n, 0)
        w = np.concatenate([self._mixw, np.repeat(self._mixw.mean(axis=1, keepdims=True),
                                                  k, axis=1)], axis=1)
        self._mixw = w / w.sum(axis=1, keepdims=True)
        pc = self.__dict__.get("_pC")
        if pc is not None:
            self.__dict__["_pC"] = pad(pc, np.nan)

    def selector_errors(self) -> tuple[np.ndarray, np.ndarray]:
        """Scale-free EW mean absolute error of each selector candidate (H x C, columns
        in :data:`CANDIDATES` order; NaN = never scored) and the weight behind each entry
        (the bias-corrected EW weight sum, about the number of recent errors)."""
        num, w = self._cerr_num, self._cerr_w
        with np.errstate(invalid="ignore", divide="ignore"):
            err = np.where(w > 0, num / np.maximum(w, 1e-12), np.nan)
        return err, w.copy()

    def seed_selector(self, errors: np.ndarray, pseudo_count: float) -> None:
        """Give the online selector a track record before it has one of its own.

        ``errors`` (H x C, :data:`CANDIDATES` order, NaN = no record) count as
        ``pseudo_count`` past errors of each candidate, so they are usable at once and own
        errors replace them as they arrive (the EW mean is bias-corrected).  Without a
        record a new forecaster uses seasonal naive (or the level) until every candidate
        has scored ``min(halflife, 100)`` errors itself.  With ``select="mix"`` the
        record also sets the blend's starting weights: half a softmax of ``-5 x error``
        over the candidates with a record, half uniform.
        """
        e = np.asarray(errors, dtype=float)
        if e.shape != self._cerr.shape:
            raise ValueError(f"errors: expected shape {self._cerr.shape}, got {e.shape}")
        if not pseudo_count > 0:
            raise ValueError("pseudo_count must be > 0")
        ok = np.isfinite(e)
        self._cerr_num = np.where(ok, e * pseudo_count, self._cerr_num)
        self._cerr_w = np.where(ok, float(pseudo_count), self._cerr_w)
        self._cerr_n = np.where(ok, np.maximum(self._cerr_n, self._warm), self._cerr_n)
        self._cerr = np.where(ok, e, self._cerr)
        if self.select == "mix":
            # The blend starts half from the record (softmax of -5 x error), half uniform.
            z = np.where(ok, -5.0 * e, -np.inf)
            z -= np.where(ok.any(axis=1), z.max(axis=1), 0.0)[:, None]
            w = np.exp(z)
            tot = w.sum(axis=1, keepdims=True)
            w = np.where(tot > 0, w / np.where(tot > 0, tot, 1.0), 1.0 / e.shape[1])
            self._mixw = 0.5 * w + 0.5 / e.shape[1]

    def _combine(self, C: np.ndarray) -> np.ndarray:
        if self.select == "model":
            return C[:, 0]
        if self.select == "mix":
            # Weighted mean of the candidates that have a forecast, weights renormalized.
            ok = ~np.isnan(C)
            w = np.where(ok, self._mixw, 0.0)
            tot = w.sum(axis=1)
            out = np.where(ok, C, 0.0)
            out *= w
            out = out.sum(axis=1) / np.where(tot > 0, tot, 1.0)
            out = np.where(tot > 0, out, C[:, 1])
            self._pmix[self._t % self.max_horizon] = out
            # Guard: while seasonal naive or persistence has had a clearly smaller recent
            # error than the blend, forecast with it (the blend's weights move too slowly
            # to leave a component that has just gone wrong, e.g. in a holiday week).
            ge = self._gerr
            best = 1 + np.argmin(ge[:, 1:], axis=1)
            use = ge[self._rows_h, best] < self.guard_margin * ge[:, 0]
            if use.any():
                base = C[self._rows_h, best]
                out = np.where(use & ~np.isnan(base), base, out)
            return out
        err = self._cerr
        # A candidate without a forecast or without a score yet is never chosen (inf);
        # the clip is nan_to_num's +-inf -> +-max, so an overflowed score still ranks.
        scored = np.where(np.isnan(C) | np.isnan(err), np.inf,
                          np.minimum(np.maximum(err, -_MAX), _MAX))
        if self.select == "best":
            # Before any error is known prefer seasonal naive, then the model.  Another
            # candidate must beat the model by the margin: switching on noise costs.
            scored[:, 0] *= self.guard_margin
            idx = np.argmin(scored, axis=1)
            idx = np.where(np.isfinite(scored[self._rows_h, idx]), idx, 1)
            out = C[self._rows_h, idx]
            out = np.where(np.isnan(out), C[:, 0], out)
            self._chosen = idx
            return out
        # blend: inverse-squared-error weights over the available candidates
        w = np.where(np.isfinite(scored), 1.0 / np.maximum(scored, 1e-9) ** 2, 0.0)
        tot = w.sum(axis=1)
        Cz = np.nan_to_num(C, nan=0.0)
        out = np.where(tot > 0, (w * Cz).sum(axis=1) / np.maximum(tot, 1e-300), C[:, 0])
        return out

    def _score_candidates(self, hi: np.ndarray, rws: np.ndarray, cands: np.ndarray,
                          value: float, s: np.ndarray) -> None:
        """Score the candidates of horizons ``hi`` (forecasts ``cands`` made at rows
        ``rws``, levels ``s``) against the actual ``value``: each candidate's bias-corrected
        EW mean scale-free absolute error (so the first few errors of a new candidate do
        not stand for its accuracy for long), and with ``select="mix"`` the guard's errors
        and an exponentiated-gradient step of the blend weights on the blend's scale-free
        absolute error, then a fixed share of uniform weight so a candidate that was poor
        can come back when the series changes.  Horizon h learns from forecasts made h
        steps ago, so h updates are in flight at once: its rate is ``mix_lr / h **
        mix_power`` (a fixed rate oscillates at long horizons).  Compiled
        (:func:`~processors.forecasting.kernels.score_candidates`)."""
        score_candidates(
            np.ascontiguousarray(hi, dtype=np.intp), np.ascontiguousarray(rws, dtype=np.intp),
            np.ascontiguousarray(cands, dtype=np.float64), float(value),
            np.ascontiguousarray(s, dtype=np.float64), self._cerr_num, self._cerr_w,
            self._cerr_n, self._cerr, int(self._warm), 1.0 - self._err_a,
            self.select == "mix", self._pmix, self._gerr, self._guard_a, self._mixw,
            self.mix_lr, self.mix_power, self.mix_share, FCLIP)
