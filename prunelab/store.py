"""A results store: one SQLite file (WAL mode), one row per finished run, keyed by its config.

Each run is committed in its own transaction the moment it is ``put``, so a crash or ``kill -9``
loses only runs that were still being computed; ``INSERT OR IGNORE`` on the primary key keeps a
run present exactly once even when several processes write the same file (WAL lets readers and
one writer work at once; ``busy_timeout`` makes the other writers wait their turn). WAL needs a
local filesystem: keep stores off NFS.

Torch-free on purpose (stdlib ``sqlite3``/``json``/``hashlib``; pandas only inside
:meth:`Store.frame`), so the process that drives a sweep, or a plotting notebook, can read
results without loading torch.

Schema::

    runs(key TEXT PRIMARY KEY, config TEXT, result TEXT, created TEXT, status TEXT)

``config`` and ``result`` are JSON objects; ``created`` is an ISO-8601 UTC timestamp;
``status`` is ``"done"`` (only finished runs are stored).
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import sqlite3
from collections.abc import Iterable, Mapping
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Store", "config_key", "canonical_json", "TABLE", "COLUMNS"]


def __dir__():
    return sorted(__all__)


TABLE = "runs"
COLUMNS = ("key", "config", "result", "created", "status")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SCHEMA = (f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY, config TEXT NOT NULL, "
           "result TEXT NOT NULL, created TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'done')")
# SQLite's default limit on bound parameters is 999 in old builds.
_CHUNK = 900


def _canonical(value: Any, where: str = "config") -> Any:
    """Plain JSON values with numbers normalised so equal configs serialise identically.

    Floats are rounded to 12 significant digits (``0.1 * 3`` and ``0.3`` hash the same), numpy
    floats are read at their own precision (``np.float32(0.1)`` is 0.1) and integral floats
    become ints (``lam=0`` and ``lam=0.0`` hash the same).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):  # also numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # also numpy floats
        # numpy prints a float32 by its shortest round-trip digits: np.float32(0.1) -> "0.1"
        f = float(str(value)) if hasattr(value, "dtype") else float(value)
        if not math.isfinite(f):
            raise ValueError(f"{where}: non-finite number {value!r} cannot be part of a key")
        f = float(f"{f:.12g}")
        return int(f) if f.is_integer() and abs(f) < 2**53 else f
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} value {value!r} is not JSON-like "
                    f"(use str, int, float, bool, None, lists and dicts)")


def canonical_json(config: Mapping[str, Any]) -> str:
    """Canonical JSON of ``config``: sorted keys, no spaces, normalised numbers."""
    return json.dumps(_canonical(dict(config)), sort_keys=True, separators=(",", ":"),
                      allow_nan=False)


def config_key(config: Mapping[str, Any]) -> str:
    """sha256 (hex) of :func:`canonical_json` of ``config``: the identity of a run.

    The same configuration gives the same key whatever the dict order or the float spelling
    (``0.001`` / ``1e-3`` / ``numpy.float32(0.001)``; ``0`` / ``0.0``).

    Raises:
        TypeError: a value that is not JSON-like.
        ValueError: a NaN or infinite number.
    """
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def _dumps(obj: Mapping[str, Any]) -> str:
    # allow_nan: measurements may be NaN (e.g. no fine-tuning); Python's json round-trips them.
    return json.dumps(dict(obj), sort_keys=True, allow_nan=True, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} value {value!r} cannot be stored as JSON")


class Store:
    """The SQLite results store at ``path`` (created with its parent folders if missing).

    Every method opens its own short-lived connection, so a ``Store`` is cheap, picklable and
    safe to use from several threads or processes at once.

    Args:
        path: the ``.sqlite`` file.
        timeout: seconds a writer waits for another process's write lock (``busy_timeout``).

    Raises:
        ValueError: ``path`` exists but is not a results store (not SQLite, or an SQLite
            database holding other tables); the file is not modified.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0):
        self.path = Path(path).expanduser()
        self.timeout = float(timeout)
        self._check_existing()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as con:
            # Switching to WAL is persistent and needs a moment of exclusive access; the busy
            # timeout covers two processes creating the same store at once.
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(_SCHEMA)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # ------------------------------------------------------------------ connection
    def _check_existing(self) -> None:
        """Refuse, read-only, a file that is not ours (before anything could write to it)."""
        p = self.path
        if not p.exists():
            return
        if p.is_dir():
            raise ValueError(f"{p} is a directory, not a results store file")
        if p.stat().st_size == 0:
            return  # SQLite treats an empty file as an empty database: nothing to lose
        with open(p, "rb") as f:
            magic = f.read(len(_SQLITE_MAGIC))
        if magic != _SQLITE_MAGIC:
            raise ValueError(f"{p} is not a prunelab results store (not an SQLite database); "
                             f"it was left untouched: pass another path")
        uri = p.resolve().as_uri() + "?mode=ro"
        try:
            with closing(sqlite3.connect(uri, uri=True, timeout=self.timeout)) as con:
                tables = {r[0] for r in con.execute(
                    "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
                cols = ({r[1] for r in con.execute(f"PRAGMA table_info({TABLE})")}
                        if TABLE in tables else set())
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{p} is not a readable SQLite database ({exc}); it was left "
                             f"untouched") from None
        if not tables:
            return  # a store whose creation was interrupted before its table existed
        if TABLE not in tables or not set(COLUMNS) <= cols:
            raise ValueError(f"{p} is an SQLite database but not a prunelab results store (tables "
                             f"{sorted(tables)}, expected {TABLE!r} with columns {list(COLUMNS)}); "
                             f"it was left untouched: pass another path")

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit, so every statement below is its own transaction.
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        # FULL: the WAL is fsynced at every commit; runs take seconds, so the cost is nil.
        con.execute("PRAGMA synchronous=FULL")
        return con

    # ------------------------------------------------------------------ writing
    def put(self, key: str, config: Mapping[str, Any], result: Mapping[str, Any], *,
            status: str = "done", created: str | None = None) -> bool:
        """Commit one finished run (its own transaction); a key already present is kept as is.

        Args:
            key: the run's identity, usually :func:`config_key` of ``config``.
            config: the run's configuration (JSON-like values).
            result: its measurements (JSON-like values; NaN allowed).
            status: stored as is; sweeps only store ``"done"``.
            created: ISO timestamp; default now (UTC).

        Returns:
            True if the row was inserted, False if ``key`` was already in the store.
        """
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        created = created or datetime.now(timezone.utc).isoformat(timespec="microseconds")
        row = (key, _dumps(config), _dumps(result), created, status)
        with closing(self._connect()) as con:
            cur = con.execute(f"INSERT OR IGNORE INTO {TABLE} ({', '.join(COLUMNS)}) "
                              f"VALUES (?, ?, ?, ?, ?)", row)
            return cur.rowcount == 1

    # ------------------------------------------------------------------ reading
    def has(self, key: str) -> bool:
        """Whether a run with ``key`` is stored."""
        with closing(self._connect()) as con:
            return con.execute(f"SELECT 1 FROM {TABLE} WHERE key = ?", (key,)).fetchone() \
                is not None

    __contains__ = has

    def get(self, key: str) -> dict[str, Any] | None:
        """``{"key", "config", "result", "created", "status"}`` of one run, or None."""
        with closing(self._connect()) as con:
            row = con.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE key = ?",
                              (key,)).fetchone()
        return None if row is None else self._decode(row)

    def keys(self) -> list[str]:
        """Keys of all stored runs, in the order they were committed."""
        with closing(self._connect()) as con:
            return [r[0] for r in con.execute(f"SELECT key FROM {TABLE} ORDER BY rowid")]

    def __len__(self) -> int:
        with closing(self._connect()) as con:
            return con.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]

    def records(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Decoded rows (see :meth:`get`): all in commit order, or those of ``keys`` in that order
        (keys not in the store are left out)."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM {TABLE}"
        with closing(self._connect()) as con:
            if keys is None:
                return [self._decode(r) for r in con.execute(sql + " ORDER BY rowid")]
            wanted = list(dict.fromkeys(keys))
            found: dict[str, dict] = {}
            for i in range(0, len(wanted), _CHUNK):
                part = wanted[i:i + _CHUNK]
                marks = ", ".join("?" * len(part))
                for r in con.execute(f"{sql} WHERE key IN ({marks})", part):
                    found[r[0]] = self._decode(r)
        return [found[k] for k in wanted if k in found]

    def frame(self, keys: Iterable[str] | None = None) -> pd.DataFrame:
        """The runs as a tidy pandas DataFrame, one row per run.

        Columns: ``key``, the config's fields, the result's fields (nested dicts flattened as
        ``"a.b"``; a result field named like a config field becomes ``"result.<name>"``),
        ``status`` and ``created`` (a UTC datetime).

        Args:
            keys: only these runs, in this order; default all, in commit order.
        """
        import pandas as pd

        rows = []
        for rec in self.records(keys):
            config, result = rec["config"], rec["result"]
            row = {"key": rec["key"], **config}
            row.update({(f"result.{k}" if k in row else k): v for k, v in result.items()})
            row.update(status=rec["status"], created=rec["created"])
            rows.append(row)
        if not rows:
            return pd.DataFrame(columns=["key", "status", "created"])
        frame = pd.json_normalize(rows)
        frame["created"] = pd.to_datetime(frame["created"], utc=True, format="ISO8601")
        return frame

    @staticmethod
    def _decode(row) -> dict[str, Any]:
        key, config, result, created, status = row
        return {"key": key, "config": json.loads(config), "result": json.loads(result),
                "created": created, "status": status}
