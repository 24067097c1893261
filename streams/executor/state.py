"""What the executor keeps across restarts, in ``<work_dir>/state.json``: the last
accepted command per API, the instances it runs, and the next offset per partition."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Instance:
    """One running API process."""

    api: str
    digest: str
    port: int
    pid: int
    create_time: float
    url: str
    command_id: str
    sequence: int
    capacity_rps: float | None = None


@dataclass
class ExecutorState:
    """What survives a restart: the last accepted command per API, the instances, and the
    next offset to read per partition."""

    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    instances: dict[str, list[Instance]] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted,
                "instances": {a: [asdict(i) for i in v] for a, v in self.instances.items()},
                "offsets": {str(p): o for p, o in self.offsets.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExecutorState:
        return cls(dict(data.get("accepted", {})),
                   {a: [Instance(**i) for i in v] for a, v in data.get("instances", {}).items()},
                   {int(p): int(o) for p, o in data.get("offsets", {}).items()})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> ExecutorState:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return cls()
