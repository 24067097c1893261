"""What ``loadcast query --sql`` may run: one reading statement over loadcast's tables.

ClickHouse's ``readonly`` setting stops writes to tables, but table functions and some
scalar functions still reach files, URLs and other servers (``file('/etc/passwd')``,
``url(...)``, ``remote(...)``, ``s3(...)``, ``INSERT INTO FUNCTION file(...)``). So before
a statement runs it is tokenized (strings, comments and quoted names understood, never
executed) and refused with :class:`SqlRefused` naming what it used when it:

- is not one ``SELECT`` / ``WITH`` / ``SHOW`` / ``DESCRIBE`` / ``EXPLAIN`` / ``EXISTS``;
- holds a second statement, or a statement keyword that writes or changes state
  (``INSERT``, ``SET``, ``SETTINGS``, ``ALTER``, ``SYSTEM``, ``INTO OUTFILE``, ...);
- calls a table function or function that reaches outside the database (``file``,
  ``url``, ``s3``, ``remote``, ``mysql``, ``postgresql``, ``hdfs``, ``input``,
  ``executable``, ...), however it is quoted or cased.

The statement then runs with ``readonly=1`` as well (belt and braces).

>>> check_sql("SELECT count() FROM telemetry WHERE endpoint_id = 'file(x)'")
>>> check_sql("SELECT * FROM file('/etc/passwd')")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
sinks.sqlguard.SqlRefused: table function or function file() reaches files, URLs or other ...
>>> check_sql("SET readonly = 0")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
sinks.sqlguard.SqlRefused: --sql runs one SELECT, WITH, SHOW, DESCRIBE, EXPLAIN or EXISTS ...
"""

from __future__ import annotations

import re

from sinks.errors import QueryError

# Table functions / functions that read or write files, URLs, other servers or processes.
FORBIDDEN_FUNCTIONS = frozenset(
    f.lower()
    for f in (
        "file", "fileCluster", "url", "urlCluster", "s3", "s3Cluster", "s3Queue", "gcs",
        "oss", "cosn", "azureBlobStorage", "azureBlobStorageCluster", "hdfs", "hdfsCluster",
        "remote", "remoteSecure", "cluster", "clusterAllReplicas", "mysql", "postgresql",
        "postgres", "mongodb", "redis", "sqlite", "odbc", "jdbc", "input", "executable",
        "executablePool", "deltaLake", "deltaLakeCluster", "hudi", "hudiCluster", "iceberg",
        "icebergS3", "icebergAzure", "icebergHDFS", "icebergCluster", "icebergS3Cluster",
        "kafka", "rabbitmq", "nats", "MaterializedPostgreSQL", "MaterializedMySQL",
        "dictionary", "fuzzJSON", "fuzzQuery", "paimon", "arrowFlight", "arrowflight",
        "prometheusQuery", "ytsaurus", "loop", "python", "catboostEvaluate",
        "modelEvaluate",
    )
)
# Keywords that write, change settings or state, or send results elsewhere.
FORBIDDEN_KEYWORDS = frozenset(
    (
        "INSERT", "SET", "SETTINGS", "ALTER", "CREATE", "DROP", "ATTACH", "DETACH",
        "RENAME", "TRUNCATE", "OPTIMIZE", "KILL", "GRANT", "REVOKE", "BACKUP", "RESTORE",
        "OUTFILE", "EXCHANGE", "UNDROP", "FUNCTION",
    )
)
ALLOWED_FIRST = ("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS")

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


class SqlRefused(QueryError):
    """A --sql statement that may not run; the message names what it used."""


def tokens(sql: str) -> list[tuple[str, str]]:
    """``(kind, text)`` tokens: kind ``word`` (bare name or keyword), ``name`` (quoted
    identifier, unquoted), ``str``, ``punct``; comments dropped. Raises :class:`SqlRefused`
    on an unterminated string, identifier or comment."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace():
            i += 1
        elif sql.startswith("--", i) or c == "#":
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            if depth:
                raise SqlRefused("unterminated /* comment")
            i = j
        elif c in "'\"`":
            j, buf = i + 1, []
            while True:
                if j >= n:
                    raise SqlRefused(f"unterminated {c}quoted{c} text")
                ch = sql[j]
                if ch == "\\" and j + 1 < n:
                    buf.append(sql[j + 1])
                    j += 2
                elif ch == c and sql.startswith(c * 2, j):
                    buf.append(c)
                    j += 2
                elif ch == c:
                    j += 1
                    break
                else:
                    buf.append(ch)
                    j += 1
            out.append(("str" if c == "'" else "name", "".join(buf)))
            i = j
        else:
            m = _WORD.match(sql, i)
            if m:
                out.append(("word", m.group()))
                i = m.end()
            else:
                out.append(("punct", c))
                i += 1
    return out


def check_sql(sql: str) -> None:
    """Raise :class:`SqlRefused` unless ``sql`` is one harmless reading statement."""
    toks = tokens(sql)
    while toks and toks[-1] == ("punct", ";"):
        toks.pop()
    if not toks:
        raise SqlRefused("empty SQL")
    first = toks[0]
    lead = next((t for t in toks if t != ("punct", "(")), first)
    if lead[0] != "word" or lead[1].upper() not in ALLOWED_FIRST:
        raise SqlRefused(
            f"--sql runs one {', '.join(ALLOWED_FIRST[:-1]).replace('DESC, ', '')} or "
            f"{ALLOWED_FIRST[-1]} statement; got {lead[1][:40]}"
        )
    for k, (kind, text) in enumerate(toks):
        if kind == "punct" and text == ";":
            raise SqlRefused("--sql runs one statement; found ';' followed by more")
        if kind == "word" and text.upper() in FORBIDDEN_KEYWORDS:
            # SHOW SETTINGS / SHOW CREATE TABLE only read; anything else is refused
            if lead[1].upper() == "SHOW" and text.upper() in ("SETTINGS", "CREATE") and k == 1:
                continue
            raise SqlRefused(f"{text.upper()} is not allowed in --sql (reads only)")
        # only a call: a column or table called e.g. `url` stays readable
        if (kind in ("word", "name") and text.lower() in FORBIDDEN_FUNCTIONS
                and k + 1 < len(toks) and toks[k + 1] == ("punct", "(")):
            raise SqlRefused(
                    f"table function or function {text}() reaches files, URLs or other "
                    "servers; --sql may not use it"
                )
    return None
