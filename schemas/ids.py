"""Maintain the embedded schema id table ``schemas/ids.json``.

``python -m schemas.ids --check`` fails when a current ``.avsc`` has no row (someone
changed a schema without giving the new version an id); ``--update`` appends rows for new
versions. Ids are only ever appended, so every process and every old record agrees.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from schemas.codec import IDS_FILE
from schemas.files import (
    current_schema_files,
    expand,
    fingerprint,
    load_schema_file,
    named_schemas,
)


def missing_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that the current schema files need and the table lacks."""
    named = named_schemas()
    known = {r["fingerprint"] for r in rows}
    next_id = max((r["id"] for r in rows), default=0) + 1
    new = []
    for name, path in current_schema_files().items():
        fp = fingerprint(expand(load_schema_file(path), named))
        if fp not in known:
            new.append({"id": next_id, "name": name, "file": path.name, "fingerprint": fp})
            known.add(fp)
            next_id += 1
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="append rows for new versions")
    parser.add_argument("--check", action="store_true", help="exit 1 if rows are missing")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = json.loads(IDS_FILE.read_text()) if IDS_FILE.exists() else []
    new = missing_rows(rows)
    for r in new:
        print(f"{'adding' if args.update else 'missing'}: id {r['id']} {r['name']} ({r['file']})")
    if args.update and new:
        IDS_FILE.write_text(json.dumps(rows + new, indent=1) + "\n")
    return 1 if (new and not args.update) else 0


if __name__ == "__main__":
    sys.exit(main())
