"""The SQLite results store: keys, exactly-once rows, several writers, refusing foreign files."""
import hashlib
import json
import math
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing

import numpy as np
import pandas as pd
import pytest

from prunelab.store import Store, canonical_json, config_key


def test_put_get_has_keys_frame(tmp_path):
    store = Store(tmp_path / "a" / "b" / "runs.sqlite")  # parent folders are created
    assert store.path.exists() and len(store) == 0 and store.keys() == []
    assert store.frame().empty
    assert store.put("k1", {"criterion": "mp", "lam": 0.0}, {"delta_loss": 0.5, "ft": math.nan})
    assert store.put("k2", {"criterion": "lm", "lam": 1e-3}, {"delta_loss": 0.25, "ft": 1.0})
    assert store.has("k1") and "k2" in store and not store.has("nope")
    assert store.get("nope") is None
    rec = store.get("k1")
    assert rec["config"] == {"criterion": "mp", "lam": 0.0} and rec["status"] == "done"
    assert rec["result"]["delta_loss"] == 0.5 and math.isnan(rec["result"]["ft"])
    assert store.keys() == ["k1", "k2"] and len(store) == 2

    frame = store.frame()
    assert list(frame.columns) == ["key", "criterion", "lam", "delta_loss", "ft", "status",
                                   "created"]
    assert frame["key"].tolist() == ["k1", "k2"]
    assert frame["lam"].tolist() == [0.0, 1e-3]
    assert isinstance(frame["created"].dtype, pd.DatetimeTZDtype)
    # A subset, in the order asked; unknown keys are left out.
    assert store.frame(["k2", "missing", "k1"])["key"].tolist() == ["k2", "k1"]
    with closing(sqlite3.connect(store.path)) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_frame_flattens_nested_and_keeps_colliding_result_fields(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.put("k", {"x": 1, "opt": {"lr": 0.1}}, {"x": 2.5, "hist": {"best": 3}})
    row = store.frame().iloc[0]
    assert row["x"] == 1 and row["result.x"] == 2.5
    assert row["opt.lr"] == 0.1 and row["hist.best"] == 3


def test_key_ignores_dict_order_and_float_spelling():
    a = {"criterion": "lm", "lam": 0.001, "sparsity": 0.9, "stages": 14, "seed": 0}
    b = {"seed": 0.0, "stages": 14, "sparsity": np.float64(0.9), "lam": 1e-3, "criterion": "lm"}
    assert config_key(a) == config_key(b)
    assert config_key({"s": 0.1 * 3}) == config_key({"s": 0.3})  # linspace-style round-off
    assert config_key({"lam": np.float32(0.1)}) == config_key({"lam": 0.1})
    assert config_key({"f": {"b": 1, "a": [1, 2.0]}}) == config_key({"f": {"a": [1, 2], "b": 1}})
    assert config_key(a) != config_key({**a, "lam": 0.01})
    assert config_key(a) != config_key({**a, "criterion": "qm"})
    expected = hashlib.sha256(canonical_json(a).encode()).hexdigest()
    assert config_key(a) == expected and len(expected) == 64
    assert canonical_json(b) == ('{"criterion":"lm","lam":0.001,"seed":0,"sparsity":0.9,'
                                 '"stages":14}')
    with pytest.raises(ValueError, match="nan"):
        config_key({"lam": float("nan")})
    with pytest.raises(TypeError, match="object"):
        config_key({"x": object()})


def test_same_key_twice_is_one_row_and_the_first_stays(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    assert store.put("k", {"a": 1}, {"v": 1.0}) is True
    first = store.get("k")
    assert store.put("k", {"a": 1}, {"v": 2.0}) is False
    assert len(store) == 1 and store.get("k") == first
    with closing(sqlite3.connect(store.path)) as con:
        assert con.execute("SELECT COUNT(*) FROM runs WHERE key = 'k'").fetchone()[0] == 1


WRITER = textwrap.dedent("""
    import os, sys, time
    from prunelab.store import Store
    path, start, go = sys.argv[1], sys.argv[2], sys.argv[5]
    lo, hi = int(sys.argv[3]), int(sys.argv[4])
    store = Store(path)
    open(start, "w").close()
    while not os.path.exists(go):  # start both writers together
        time.sleep(0.005)
    for i in range(lo, hi):
        store.put(f"k{i:03d}", {"i": i}, {"pid": os.getpid()})
""")


def test_two_processes_write_the_same_store(tmp_path):
    path, go = tmp_path / "shared.sqlite", tmp_path / "go"
    Store(path)
    # Overlapping key ranges: keys 20..39 are written by both processes.
    ranges = [(0, 40), (20, 60)]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(tmp_path / f"s{j}"),
                               str(lo), str(hi), str(go)]) for j, (lo, hi) in enumerate(ranges)]
    deadline = time.time() + 60
    while not all((tmp_path / f"s{j}").exists() for j in range(2)) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    store = Store(path)
    frame = store.frame()
    assert len(frame) == 60 and frame["key"].is_unique
    assert set(frame["key"]) == {f"k{i:03d}" for i in range(60)}
    assert frame["pid"].nunique() == 2
    with closing(sqlite3.connect(path)) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("kind", ["text", "other_sqlite", "directory"])
def test_a_file_that_is_not_a_store_is_refused_untouched(tmp_path, kind):
    folder = tmp_path / "f"
    folder.mkdir()
    if kind == "text":
        path = folder / "notes.sqlite"
        path.write_text("my precious notes\n")
    elif kind == "other_sqlite":
        path = folder / "other.db"
        with closing(sqlite3.connect(path)) as con:
            con.execute("CREATE TABLE people (name TEXT)")
            con.execute("INSERT INTO people VALUES ('ada')")
            con.commit()
    else:
        path = folder / "dir.sqlite"
        path.mkdir()
    before = _snapshot(folder) if kind != "directory" else None
    with pytest.raises(ValueError, match="not a (prunelab )?results store"):
        Store(path)
    if before is not None:
        assert _snapshot(folder) == before  # same files, bytes and mtimes: no -wal, no table


def test_an_empty_file_becomes_a_store(tmp_path):
    path = tmp_path / "new.sqlite"
    path.touch()
    store = Store(path)
    assert store.put("k", {}, {}) and len(Store(path)) == 1


def test_results_are_json(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.put("k", {"stages": np.int64(14)}, {"loss": np.float32(0.5), "path": tmp_path})
    with closing(sqlite3.connect(store.path)) as con:
        config, result = con.execute("SELECT config, result FROM runs").fetchone()
    assert json.loads(config) == {"stages": 14}
    assert json.loads(result) == {"loss": 0.5, "path": str(tmp_path)}
    with pytest.raises(TypeError):
        store.put("k2", {}, {"x": object()})
    assert len(store) == 1


def test_import_is_torch_free():
    code = ("import sys, prunelab.store; "
            "assert 'torch' not in sys.modules and 'pandas' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
