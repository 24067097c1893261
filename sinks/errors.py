"""The error every query path raises for a request it will not run (HTTP 400, exit 2)."""

from __future__ import annotations


class QueryError(ValueError):
    """A query request that cannot be run as asked (unknown name, bad parameter, SQL the
    guard refuses)."""
