"""Sweeps: one run's measurements, the grid, resuming, kill -9, and local vs Dask executors.

Everything runs on sklearn's 8x8 digits with a zoo model trained here in a few seconds (into a
temporary ``PRUNELAB_DATA``, for this process and every subprocess and worker), 1 fine-tuning
epoch and a 200-example pruning batch.
"""
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from prunelab import experiments as E
from prunelab import paths, zoo
from prunelab.store import Store, config_key
from prunelab.train import Recipe

TINY = dict(arch="mlp", dataset="digits", seed=0, finetune={"epochs": 1}, examples=200)
GRID = dict(TINY, criterion=["mp", "snip"], sparsity=[0.5, 0.9], stages=[1, 3])  # 8 runs
ZOO_RECIPE = Recipe(optimizer="adam", lr=1e-3, epochs=8, batch_size=50)
NON_TIMING = [c for c in E.MEASURED if c not in E.TIMINGS]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A private data folder with a quickly trained mlp-digits-s0 in its zoo."""
    root = tmp_path_factory.mktemp("lab")
    mp = pytest.MonkeyPatch()
    data = root / "data"
    mp.setenv("PRUNELAB_DATA", str(data))  # inherited by subprocesses and workers
    mp.setattr(paths, "DATA", data)  # paths read the environment at import time
    mp.setattr(paths, "ZOO", data / "zoo")
    mp.setattr(paths, "RESULTS", data / "results")
    zoo.train_and_save("mlp", "digits", 0, root=data / "zoo", recipe=ZOO_RECIPE, progress=False)
    yield SimpleNamespace(root=root, zoo=data / "zoo", results=data / "results")
    mp.undo()


@pytest.fixture(scope="module")
def inline_frame(lab):
    """GRID run inline (workers=0) into its own store."""
    return E.Sweep(**GRID).run(lab.results / "inline.sqlite", workers=0, progress=False)


def test_run_one_measures_the_documented_columns(lab):
    config = dict(TINY, criterion="snip", sparsity=0.9, stages=3, lam=1e-3)
    threads = torch.get_num_threads()
    row = E.run_one(config)
    assert list(row) == ["key", *E.FIELDS, *E.MEASURED]
    assert row["key"] == config_key(E.normalize_config(config))
    assert row["finetune"] == 'recipe{"epochs":1}' and row["lam"] == 1e-3
    assert abs(row["sparsity_actual"] - 0.9) < 1e-3
    assert row["delta_loss"] == abs(row["loss_pruned"] - row["loss_dense"])
    assert row["loss_pruned"] > row["loss_dense"]  # 90 % of the weights gone hurts
    for col in E.MEASURED:
        if "error" in col and "gap" not in col:
            assert 0.0 <= row[col] <= 1.0, col
    assert row["val_error_gap"] == row["val_error"] - row["val_error_dense"]
    assert row["val_error_gap_ft"] == row["val_error_ft"] - row["val_error_dense"]
    assert row["train_loss_ft"] < row["train_loss"]  # one epoch of fine-tuning helps
    recipe = json.loads(row["finetune_recipe"])
    assert recipe == ZOO_RECIPE.replace(epochs=1).to_dict()  # the checkpoint's recipe, epochs=1
    assert row["finetune_epochs"] == 1
    assert 0 < row["prune_seconds"] <= row["seconds"] and row["finetune_seconds"] > 0
    assert torch.get_num_threads() == threads  # restored

    again = E.run_one(config)
    assert {c: again[c] for c in NON_TIMING} == {c: row[c] for c in NON_TIMING}

    bare = E.run_one(dict(config, finetune=None))
    assert bare["finetune"] == "none" and bare["finetune_recipe"] is None
    assert all(math.isnan(bare[c]) for c in ("loss_ft", "val_error_ft", "val_error_gap_ft"))
    assert {c: bare[c] for c in ("delta_loss", "val_error")} == \
        {c: row[c] for c in ("delta_loss", "val_error")}


def test_configs_are_the_cartesian_product_in_canonical_form():
    sweep = E.Sweep(**GRID)
    configs = sweep.configs()
    assert len(sweep) == len(configs) == 8
    assert all(list(c) == list(E.FIELDS) for c in configs)
    assert {(c["criterion"], c["sparsity"], c["stages"]) for c in configs} == {
        (c, s, p) for c in ("mp", "snip") for s in (0.5, 0.9) for p in (1, 3)}
    assert len(set(sweep.keys())) == 8
    # numpy grids, repeated values and every spelling of a fine-tuning spec
    same = E.Sweep(**dict(GRID, sparsity=np.array([0.5, 0.9, 0.9]), stages=np.arange(1, 4, 2),
                          finetune='recipe{"epochs":1}'))
    assert same.keys() == sweep.keys()
    forms = E.Sweep(**dict(TINY, finetune=["recipe", None, {}, {"lr": 1e-2, "epochs": 2},
                                           Recipe(epochs=3)])).grid["finetune"]
    assert forms[:3] == ["recipe", "none", 'recipe{"epochs":2,"lr":0.01}']
    assert forms[3].startswith("recipe{") and json.loads(forms[3][6:])["epochs"] == 3
    assert E.Sweep(**TINY, lam=[0, 0.0, 1e-3, 0.001]).grid["lam"] == [0.0, 1e-3]


@pytest.mark.parametrize("field,value,shown", [
    ("criterion", ["mp", "nope"], "nope"),
    ("sparsity", [0.5, 1.0], "1.0"),
    ("sparsity", -0.1, "-0.1"),
    ("stages", [1, 0], "0"),
    ("stages", 2.5, "2.5"),
    ("lam", [0.0, -1e-3], "-0.001"),
    ("schedule", "cosine", "cosine"),
    ("scope", "everywhere", "everywhere"),
    ("arch", "mlp9000", "mlp9000"),
    ("dataset", "imagenet", "imagenet"),
    ("finetune", {"epoch": 1}, "epoch"),
    ("finetune", {"lr": -1.0}, "-1.0"),
    ("examples", 0, "0"),
    ("seed", [], "no values"),
    ("temperature", 1.0, "temperature"),
])
def test_a_bad_grid_is_refused_before_anything_runs(field, value, shown):
    with pytest.raises(ValueError, match=shown.replace(".", r"\.")) as info:
        E.Sweep(**{**TINY, field: value})
    assert field in str(info.value)


def test_rerunning_skips_finished_runs(lab, inline_frame):
    store = Store(lab.results / "inline.sqlite")
    sweep = E.Sweep(**GRID)
    assert inline_frame.attrs == {"ran": 8, "skipped": 0, "failed": 0, "interrupted": False}
    assert list(inline_frame.columns) == [*E.FIELDS, *E.MEASURED, "key", "created"]
    assert inline_frame["key"].tolist() == sweep.keys()  # grid order
    assert abs(inline_frame["sparsity_actual"] - inline_frame["sparsity"]).max() < 1e-3

    again = sweep.run(store, workers=0, progress=False)
    assert again.attrs["ran"] == 0 and again.attrs["skipped"] == 8
    pd.testing.assert_frame_equal(again, inline_frame)  # same rows, same commit times
    # A grown grid runs only the new points.
    grown = E.Sweep(**dict(GRID, criterion=["mp"], sparsity=[0.5, 0.9, 0.95]))
    frame = grown.run(store, workers=0, progress=False)
    assert frame.attrs["ran"] == 2 and frame.attrs["skipped"] == 4 and len(frame) == 6
    assert len(store) == 10
    assert sweep.frame(store).equals(inline_frame)


def test_interrupt_keeps_committed_runs_and_resumes(lab, monkeypatch):
    store = lab.results / "interrupt.sqlite"
    sweep = E.Sweep(**dict(TINY, criterion="mp", sparsity=[0.3, 0.5, 0.7, 0.9]))
    calls, real = [], E._measure

    def measure(config, *args):
        calls.append(config["sparsity"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # Jupyter's Interrupt during the third run
        return real(config, *args)

    monkeypatch.setattr(E, "_measure", measure)
    partial = sweep.run(store, workers=1, progress=False, on_interrupt="return")
    assert partial.attrs["interrupted"] and partial.attrs["ran"] == 2
    assert partial["sparsity"].tolist() == [0.3, 0.5]
    frame = sweep.run(store, workers=1, progress=False)
    assert frame.attrs == {"ran": 2, "skipped": 2, "failed": 0, "interrupted": False}
    assert frame["sparsity"].tolist() == [0.3, 0.5, 0.7, 0.9] and frame["key"].is_unique


def test_interrupt_propagates_after_committing_finished_runs(lab, monkeypatch):
    store = lab.results / "interrupt-raise.sqlite"
    sweep = E.Sweep(**dict(TINY, criterion="mp", sparsity=[0.3, 0.5, 0.7]))
    calls, real = [], E._measure

    def measure(config, *args):
        calls.append(config["sparsity"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Jupyter's Interrupt during the second run
        return real(config, *args)

    monkeypatch.setattr(E, "_measure", measure)
    with pytest.raises(KeyboardInterrupt, match="1 of 3 runs committed"):
        sweep.run(store, workers=1, progress=False)
    assert calls == [0.3, 0.5]  # the third run never started
    assert sweep.frame(store)["sparsity"].tolist() == [0.3]  # the finished run is committed
    with pytest.raises(ValueError, match="on_interrupt.*'swallow'"):
        sweep.run(store, workers=1, progress=False, on_interrupt="swallow")


def test_failed_runs_are_reported_and_the_others_committed(lab, monkeypatch):
    store = lab.results / "failures.sqlite"
    sweep = E.Sweep(**dict(TINY, criterion=["mp", "snip"], sparsity=0.5))
    real = E._measure

    def measure(config, *args):
        if config["criterion"] == "snip":
            raise FloatingPointError("diverged")
        return real(config, *args)

    monkeypatch.setattr(E, "_measure", measure)
    with pytest.raises(E.SweepError, match="1 of 2 runs failed") as info:
        sweep.run(store, workers=0, progress=False)
    assert "FloatingPointError: diverged" in info.value.failures[0][1]
    assert sweep.frame(store)["criterion"].tolist() == ["mp"]


def test_bad_run_arguments_are_refused_before_anything_runs(lab, tmp_path):
    sweep = E.Sweep(**dict(TINY, examples=5000))  # digits has ~1,000 training examples
    store = tmp_path / "s.sqlite"
    with pytest.raises(ValueError, match="examples=.5000"):
        sweep.run(store, workers=0, progress=False)
    assert len(Store(store)) == 0
    with pytest.raises(ValueError, match="executor"):
        E.Sweep(**TINY).run(store, executor="slurm", progress=False)
    with pytest.raises(ValueError, match="workers"):
        E.Sweep(**TINY).run(store, workers=-1, progress=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(ValueError, match="not a prunelab results store"):
        E.Sweep(**TINY).run(notes, progress=False)
    assert notes.read_text() == "keep me"
    assert E.Sweep(**TINY).frame(tmp_path / "absent.sqlite").empty
    assert not (tmp_path / "absent.sqlite").exists()


def test_a_missing_zoo_model_is_trained_once_first(lab, monkeypatch):
    monkeypatch.setitem(zoo.RECIPES, ("mlp", "digits"), ZOO_RECIPE.replace(epochs=2))
    assert not (lab.zoo / "mlp-digits-s1.json").exists()
    frame = E.Sweep(**dict(TINY, seed=1, criterion="mp", sparsity=[0.5, 0.9])).run(
        "seed1.sqlite", workers=0, progress=False)  # a bare name goes under data/results
    assert (lab.results / "seed1.sqlite").exists()
    assert (lab.zoo / "mlp-digits-s1.safetensors").exists() and len(frame) == 2
    assert json.loads(frame["finetune_recipe"][0])["lr"] == ZOO_RECIPE.lr


SWEEP_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    import prunelab as pl
    grid, store, zoo_root = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    pl.experiments.Sweep(**grid).run(store, executor="local", workers=1, progress=False,
                                     zoo_root=zoo_root)
""")


def _count(path) -> int:
    # closing(): sqlite3's own context manager commits but does not close, and connections left
    # open in this process would keep a stale view of the WAL.
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.slow
def test_kill_9_halfway_then_restart_has_every_run_exactly_once(lab, tmp_path):
    store = tmp_path / "killed.sqlite"
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_SCRIPT)
    grid = GRID
    args = [sys.executable, str(script), json.dumps(grid), str(store), str(lab.zoo)]
    env = {**os.environ, "PRUNELAB_DATA": str(lab.root / "data")}

    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _count(store) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the sweep did not commit 3 runs in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    committed = Store(store).records()
    assert 3 <= len(committed) < 8, "killed too late to test anything"

    done = subprocess.run(args, env=env, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()
    sweep = E.Sweep(**grid)
    frame = sweep.frame(store)
    assert sorted(frame["key"]) == sorted(sweep.keys()) and frame["key"].is_unique
    with closing(sqlite3.connect(store)) as con:
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 8
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    after = {r["key"]: r for r in Store(store).records()}
    assert all(after[r["key"]] == r for r in committed)  # earlier rows unchanged


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_frame_as_local(lab, inline_frame):
    sweep = E.Sweep(**GRID)
    local = sweep.run(lab.results / "local.sqlite", executor="local", workers=2, progress=False)
    dask = sweep.run(lab.results / "dask.sqlite", executor="dask", workers=2, progress=False)
    assert local.attrs["ran"] == dask.attrs["ran"] == 8
    columns = [*E.FIELDS, *NON_TIMING, "key"]
    expected = inline_frame[columns].sort_values("key").reset_index(drop=True)
    for frame in (local, dask):
        got = frame[columns].sort_values("key").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected, check_exact=True)


@pytest.mark.slow
def test_dask_local_cluster_workers_keep_glibcs_dynamic_mmap_threshold():
    """executor="dask"'s cluster: one thread per worker, and no MALLOC_TRIM_THRESHOLD_ (Dask's
    default of 65536 fixes glibc's mmap threshold: every large tensor a fresh zeroed mmap)."""
    import os

    pytest.importorskip("distributed")
    from distributed import Client

    from prunelab import executors as X

    with X.local_cluster(1) as cluster, Client(cluster) as client:
        env = client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_")
        threads = client.run(os.environ.get, "OMP_NUM_THREADS")
        info = client.scheduler_info()["workers"]
    assert list(env.values()) == [None]
    assert list(threads.values()) == ["1"]  # Dask's other pre-spawn settings stay
    assert [w["nthreads"] for w in info.values()] == [1]
