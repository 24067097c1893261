"""``loadcast demo``: the whole pipeline under real-shaped traffic (see
:mod:`loadcast.demo`, imported inside the command: it pulls in every part)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from loadcast.cli.common import SettingsFn, console, fail


def register(app: typer.Typer, get_settings: SettingsFn) -> None:
    """Add ``demo`` to the root ``app``."""
    app.command("demo")(_demo(get_settings))


def _demo(get_settings: SettingsFn) -> Callable[..., None]:
    def demo(
        quick: Annotated[
            bool, typer.Option("--quick", help="About a minute of live traffic instead of four.")
        ] = False,
        out: Annotated[
            Path, typer.Option(help="Where report.html, summary.json and the logs go.")
        ] = Path("out/demo"),
        live_seconds: Annotated[
            int | None, typer.Option(help="Seconds of live traffic (default 240, quick 60).",
                                     min=10)
        ] = None,
        trace: Annotated[
            Path | None, typer.Option(help="timestamp,value CSV (default: the ELB trace).")
        ] = None,
    ) -> None:
        """The whole pipeline on embedded defaults under real-shaped traffic, with a live view;
        ends in OUT/report.html and OUT/summary.json."""
        from loadcast.demo import run_demo
        from loadcast.demo.processes import DemoError

        try:
            run_demo(get_settings(), out_dir=out, quick=quick, live_seconds=live_seconds,
                     trace_path=trace)
        except FileNotFoundError as e:
            raise fail(str(e)) from None
        except DemoError as e:
            raise fail(str(e), 1) from None
        except KeyboardInterrupt:
            console.print("demo interrupted: everything stopped, no report written")
            raise typer.Exit(130) from None

    return demo
