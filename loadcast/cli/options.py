"""Options every ``loadcast`` command spells the same way (typer only: light to import).

- ``-b/--bootstrap HOST:PORT`` on every command that talks to Kafka (overrides
  ``kafka.bootstrap_servers``).
- ``--log-level`` before the command (``loadcast --log-level info worker``) or after it
  (``loadcast worker --log-level info``), one set of values for both: ``debug``, ``info``,
  ``warning`` (or ``warn``), ``error``, any case. It sets Python logging; given after the
  command of a Faust app (worker, coordinator, planner) it also sets Faust's own level,
  which otherwise stays ``warn`` (Faust is chatty).

>>> parse_log_level("warn"), parse_log_level("INFO")
(30, 20)
>>> faust_level(30)
'warn'
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "warn": logging.WARNING, "error": logging.ERROR}
LEVEL_HELP = "debug, info, warning (warn) or error (any case)."

BootstrapOpt = Annotated[
    str | None,
    typer.Option("--bootstrap", "-b", help="Kafka bootstrap servers HOST:PORT[,...] "
                                           "(overrides kafka.bootstrap_servers)."),
]


def parse_log_level(text: str) -> int:
    """The logging level named by ``text``; :class:`typer.BadParameter` names the choices."""
    level = LEVELS.get(text.strip().lower())
    if level is None:
        raise typer.BadParameter(f"{text!r} is not one of {LEVEL_HELP}", param_hint="--log-level")
    return level


def _check(value: str | None) -> str | None:
    if value is not None:
        parse_log_level(value)
    return value


LogLevelOpt = Annotated[
    str | None,
    typer.Option("--log-level", help=f"{LEVEL_HELP} Same as before the command.",
                 callback=_check),
]


def set_log_level(text: str | None) -> int:
    """Apply ``--log-level`` given to a command (None: keep the root's); the level in force."""
    root = logging.getLogger()
    if text is not None:
        root.setLevel(parse_log_level(text))
    return root.getEffectiveLevel()


def faust_level(level: int) -> str:
    """Faust's name for a logging level."""
    if level <= logging.DEBUG:
        return "debug"
    if level <= logging.INFO:
        return "info"
    if level <= logging.WARNING:
        return "warn"
    return "error"


def faust_loglevel(text: str | None) -> str:
    """Faust's level for a command's ``--log-level`` (also applied to Python logging);
    ``warn`` when the command was given none.

    >>> faust_loglevel(None)
    'warn'
    """
    return "warn" if text is None else faust_level(set_log_level(text))
