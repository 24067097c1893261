"""``loadcast settings``: every setting in one place: section, field, environment
variable, default, the value in force (env + settings file; secrets masked) and what it
means, tab-separated, one section after another (a ``#`` line names the section's class)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from loadcast.cli.common import SettingsFn, fail
from loadcast.settings import Settings, catalog


def register(app: typer.Typer, get_settings: SettingsFn) -> None:
    """Add ``settings`` to the root ``app``."""
    app.command("settings")(_settings(get_settings))


def _settings(get_settings: SettingsFn) -> Callable[..., None]:
    def settings(
        sections: Annotated[
            list[str] | None,
            typer.Argument(help=f"Only these sections ({', '.join(Settings.model_fields)}).",
                           show_default=False),
        ] = None,
    ) -> None:
        """Every setting: name, variable, default, value in force, meaning (tab-separated)."""
        unknown = sorted(set(sections or ()) - set(Settings.model_fields))
        if unknown:
            raise fail(f"no section {', '.join(unknown)}: one of "
                       f"{', '.join(Settings.model_fields)}")
        print("setting\tenv\tdefault\tvalue\tdescription")
        shown = ""
        for r in catalog(get_settings()):
            if sections and r.section not in sections:
                continue
            if r.section != shown:
                shown = r.section
                print(f"# [{r.section}] {r.defined_in}")
            print(f"{r.name}\t{r.env}\t{r.default}\t{r.value}\t{r.description}")

    return settings
