"""``loadcast coordinator`` and ``loadcast model list/show``: federated learning's
coordinator and its global model repository. Faust, Kafka and numpy are imported inside
the commands (start-up speed of ``loadcast --help``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError

from loadcast.cli.common import SettingsFn, ensure_kafka, fail
from loadcast.cli.options import BootstrapOpt, LogLevelOpt, faust_loglevel
from processors.apps.federated_settings import FederatedSettings

if TYPE_CHECKING:
    from streams.model_repo import ModelRepository


def register(app: typer.Typer, get_settings: SettingsFn) -> None:
    """Add ``coordinator`` and ``model list|show`` to the root ``app``."""
    app.command("coordinator")(_coordinator(get_settings))
    model_app = typer.Typer(help="The global model repository (the global-model topic).",
                            no_args_is_help=True)
    model_app.command("list")(_model_list(get_settings))
    model_app.command("show")(_model_show(get_settings))
    app.add_typer(model_app, name="model")


def _coordinator(get_settings: SettingsFn) -> Callable[..., None]:
    def coordinator(
        bootstrap: BootstrapOpt = None,
        aggregation: Annotated[
            str | None, typer.Option(help="fedavg, median or trimmed-mean (overrides settings).")
        ] = None,
        min_updates: Annotated[
            int | None, typer.Option(help="Edges that close a round.", min=1)
        ] = None,
        round_timeout: Annotated[
            float | None, typer.Option(help="Seconds after a round's first update.", min=0.001)
        ] = None,
        log_level: LogLevelOpt = None,
    ) -> None:
        """Run the federated coordinator: rounds of model updates -> global model versions."""
        from processors.apps.coordinator import run_coordinator

        s = get_settings(bootstrap)
        over = {k: v for k, v in (("aggregation", aggregation), ("min_updates", min_updates),
                                  ("round_timeout_seconds", round_timeout)) if v is not None}
        try:
            fed = FederatedSettings(**{**s.federated.model_dump(), **over})
        except ValidationError as e:
            raise fail("; ".join(f"federated.{'.'.join(map(str, x['loc']))}: {x['msg']}"
                                 for x in e.errors())) from None
        ensure_kafka(s.kafka)
        run_coordinator(s.kafka, fed, loglevel=faust_loglevel(log_level))

    return coordinator


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _repo(get_settings: SettingsFn, bootstrap: str | None, timeout: float) -> ModelRepository:
    from streams.model_repo import ModelRepository
    from streams.sdk import make_codec

    s = get_settings(bootstrap)
    try:
        repo = ModelRepository(s.kafka, make_codec(s.kafka), client_id="loadcast-model-cli")
    except Exception as e:
        raise fail(f"cannot read the global-model topic at {s.kafka.bootstrap_servers}: {e}",
                   1) from None
    repo.refresh(timeout)
    return repo


def _model_list(get_settings: SettingsFn) -> Callable[..., None]:
    def model_list(
        bootstrap: BootstrapOpt = None,
        family: Annotated[str | None, typer.Option(help="Only this model family.")] = None,
        timeout: Annotated[float, typer.Option(help="Seconds to read the topic.", min=0)] = 10.0,
    ) -> None:
        """Every global model version on the topic, one per line (tab-separated)."""
        repo = _repo(get_settings, bootstrap, timeout)
        try:
            print("family\tversion\tround\tcreated_utc\taggregation\tedges\tsamples\t"
                  "validation_error")
            for fam in repo.families():
                if family and fam != family:
                    continue
                for v in repo.versions(fam):
                    verr = v.metrics.get("validation_error")
                    print(f"{fam}\t{v.version}\t{v.round}\t{_when(v.created_at)}\t"
                          f"{v.aggregation}\t{len(v.participants)}\t{v.num_samples}\t"
                          f"{'-' if verr is None else f'{verr:.4f}'}")
        finally:
            repo.close()

    return model_list


def _model_show(get_settings: SettingsFn) -> Callable[..., None]:
    def model_show(
        family: Annotated[
            str, typer.Argument(help="Model family, e.g. default-rls/60s/86400s/h15.")],
        version: Annotated[int | None, typer.Option(help="Default: the latest.")] = None,
        bootstrap: BootstrapOpt = None,
        timeout: Annotated[float, typer.Option(help="Seconds to read the topic.", min=0)] = 10.0,
        values: Annotated[bool, typer.Option("--values", help="Print every parameter value.")
                          ] = False,
    ) -> None:
        """One version as JSON: metadata, metrics, and parameter shapes and norms (or values)."""
        import numpy as np

        repo = _repo(get_settings, bootstrap, timeout)
        try:
            state = repo.latest(family) if version is None else repo.get(family, version)
            if state is None:
                known = ", ".join(repo.families()) or "none"
                raise fail(f"no version {version if version is not None else ''} of "
                           f"{family!r} on the topic (families: {known})", 1)
            out = {
                "family": state.family, "version": state.version, "round": state.round,
                "created_at": _when(state.created_at), "aggregation": state.aggregation,
                "participants": state.participants, "num_samples": state.num_samples,
                "metrics": state.metrics,
                "params": {k: {"shape": list(v.shape), "l2_norm": float(np.linalg.norm(v)),
                               "samples": state.samples.get(k),
                               **({"values": v.tolist()} if values else {})}
                           for k, v in state.params.items()},
                "stats": {k: {"shape": list(v.shape),
                              **({"values": v.tolist()} if values else {})}
                          for k, v in state.stats.items()},
            }
            print(json.dumps(out, indent=2, default=str))
        finally:
            repo.close()

    return model_show
