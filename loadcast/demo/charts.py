"""The demo report's charts (matplotlib, imported when drawing: it is slow to import),
as base64 PNGs."""

from __future__ import annotations

import base64
import io
from datetime import datetime
from typing import Any

from loadcast.demo import scenario as scn

COLORS = {"predictive": "#1f77b4", "predictive-persistence": "#9467bd",
          "round-robin": "#d62728", "peak-ewma": "#2ca02c"}


def charts(facts: dict[str, Any], q: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    return {"latency": _latency(plt, facts, q), "forecast": _forecast(plt, facts, q),
            "weights": _weights(plt, facts, q), "mirrors": _mirrors(plt, facts, q)}


def _latency(plt: Any, facts: dict[str, Any], q: dict[str, Any]) -> str:
    """p99 and errors per lane and region."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 7), sharex=True)
    for col, region in enumerate((scn.CENTRAL, scn.EDGE)):
        ax, ax2 = axes[0][col], axes[1][col]
        for p in scn.POLICIES:
            s = q["p99"][p][region]
            if s:
                ax.plot([x[0] for x in s], _rolling([x[1] for x in s]), color=COLORS[p],
                        label=p, lw=1.6)
            e = q["errors"][p][region]
            if e:
                ax2.plot([x[0] for x in e], _rolling([100 * x[1] / x[2] if x[2] else 0
                                                      for x in e]), color=COLORS[p], label=p)
        _shade(ax, facts, legend=col == 0)
        _shade(ax2, facts)
        ax.set_title(f"{region} clients: p99 latency (5 s rolling)")
        ax.set_ylabel("p99 ms")
        ax.set_yscale("log")
        ax2.set_title(f"{region} clients: errors (5 s rolling)")
        ax2.set_ylabel("% of requests")
        ax2.set_xlabel("seconds since live start")
    # Above the charts, not over the lines.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _png(fig)


def _forecast(plt: Any, facts: dict[str, Any], q: dict[str, Any]) -> str:
    """Forecast vs actual per endpoint."""
    eps = list(q["forecast"])
    fig, axes = plt.subplots(len(eps), 1, figsize=(13, 2.3 * len(eps)), sharex=True,
                             squeeze=False)
    for ax, ep in zip(axes[:, 0], eps, strict=True):
        pts = q["forecast"][ep]
        if pts:
            xs = [p[0] for p in pts]
            ax.fill_between(xs, [p[3] for p in pts], [p[4] for p in pts], color="#1f77b4",
                            alpha=0.2, label="90 % band")
            ax.plot(xs, [p[2] for p in pts], color="#1f77b4", lw=1.4,
                    label=f"forecast made {q['horizon']} s before")
            ax.plot([p[0] for p in pts if p[1] is not None],
                    [p[1] for p in pts if p[1] is not None], color="black", lw=1.0,
                    label="actual")
        ax.axhline(facts["capacities"][ep], color="gray", ls="--", lw=1, label="capacity")
        _shade(ax, facts)
        ax.set_title(ep, loc="left", fontsize=10)
        ax.set_ylabel("req/s")
    axes[0, 0].legend(loc="upper left", ncol=4, fontsize=8)
    axes[-1, 0].set_xlabel("seconds since live start")
    fig.tight_layout()
    return _png(fig)


def _weights(plt: Any, facts: dict[str, Any], q: dict[str, Any]) -> str:
    """The predictive lane's routing weights."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.6), sharey=True)
    for ax, sid in zip(axes, ("predictive-central", "predictive-edge"), strict=True):
        for ep, pts in sorted(q["weights"].get(sid, {}).items()):
            if "@" in ep:
                continue
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label=ep)
        _shade(ax, facts)
        ax.set_title(f"{sid} sidecar: routing weights")
        ax.set_xlabel("seconds since live start")
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel("weight")
    fig.tight_layout()
    return _png(fig)


def _mirrors(plt: Any, facts: dict[str, Any], q: dict[str, Any]) -> str:
    """Edge demand, capacity and mirror activations."""
    fig, ax = plt.subplots(figsize=(13, 3.4))
    d = q["edge_demand"]
    ax.plot([x[0] for x in d], [x[1] for x in d], color="black", lw=1.2,
            label="edge demand, predictive lane (req/s)")
    ax.axhline(facts["edge_capacity_rps"], color="gray", ls="--", lw=1,
               label="edge region's central capacity")
    t = facts["t_live"]
    ready = {s["command_id"]: s["t_ms"] / 1000 - t for s in q["statuses"]
             if s["state"] == "READY"}
    # DRAINING/RETIRED carry the RETIRE command's id, not the activation's: a ready span
    # ends at the first of them after it (the demo has one edge region).
    gone = sorted(s["t_ms"] / 1000 - t for s in q["statuses"]
                  if s["state"] in ("DRAINING", "RETIRED"))
    first = True
    for a in ready.values():
        b = min([g for g in gone if g > a] + [facts["t_end"] - t])
        ax.axvspan(a, b, color="green", alpha=0.15, label="mirror ready" if first else None)
        first = False
    for c in q["commands"]:
        ax.axvline(c["t_ms"] / 1000 - t, color="green" if c["action"] == "ACTIVATE" else
                   "purple", lw=1, ls=":")
    crossed = [datetime.fromisoformat(r["crossed_at"]).timestamp() - t for r in q["lead"]
               if r.get("crossed_at")]
    if crossed:
        ax.plot(crossed, [facts["edge_capacity_rps"]] * len(crossed), "rv", ms=8,
                label="demand crossed capacity (mirror-lead-time)")
    _shade(ax, facts)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since live start (dotted: ACTIVATE green, RETIRE purple)")
    ax.set_ylabel("req/s")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("edge region: demand, capacity and mirror activations")
    fig.tight_layout()
    return _png(fig)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _shade(ax: Any, facts: dict[str, Any], legend: bool = False) -> None:
    t = facts["t_live"]
    d0, d1 = facts["degrade_window"]
    ax.axvspan(d0 - t, d1 - t, color="orange", alpha=0.15,
               label="central backend degraded" if legend else None)
    for i, (a, b) in enumerate(facts["spike_windows"]):
        ax.axvspan(a - t, b - t, color="red", alpha=0.10,
                   label="edge spike" if legend and i == 0 else None)


def _rolling(xs: list[float], n: int = 5) -> list[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        if len(acc) > n:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out
