"""The pretrained zoo: cached, verified, never unpickling code."""
import json
import os
import pickle

import pytest
import torch

import prunelab as pl
from prunelab import zoo
from prunelab.train import Recipe

FAST = Recipe(optimizer="adam", lr=1e-2, epochs=2, batch_size=100)


def test_committed_default_model_loads_with_manifest_metrics():
    model, bundle = pl.zoo.load("mlp", "mnist1d", seed=0, train_if_missing=False)
    entry = json.loads((pl.paths.ZOO / "mlp-mnist1d-s0.json").read_text())
    assert entry["metrics"]["val_accuracy"] > 0.5
    acc = pl.train.evaluate(model, bundle.test)["accuracy"]
    assert acc == pytest.approx(entry["metrics"]["test_accuracy"], abs=1e-6)
    assert not model.training


def test_train_save_load_roundtrip(tmp_zoo):
    entry = zoo.train_and_save("mlp", "digits", seed=1, root=tmp_zoo, recipe=FAST, progress=False)
    assert set(entry) >= {"arch", "dataset", "seed", "recipe", "metrics", "sha256"}
    model, bundle = zoo.load("mlp", "digits", seed=1, root=tmp_zoo, train_if_missing=False)
    acc = pl.train.evaluate(model, bundle.test)["accuracy"]
    assert acc == pytest.approx(entry["metrics"]["test_accuracy"])
    frame = zoo.manifest(tmp_zoo)
    assert frame.loc[0, "arch"] == "mlp" and bool(frame.loc[0, "present"])


def test_training_is_deterministic(tmp_path):
    a = zoo.train_and_save("mlp", "digits", seed=3, root=tmp_path / "a", recipe=FAST, progress=False)
    b = zoo.train_and_save("mlp", "digits", seed=3, root=tmp_path / "b", recipe=FAST, progress=False)
    assert a["sha256"] == b["sha256"]  # same weights, bit for bit


def test_corrupted_checkpoint_is_refused(tmp_zoo):
    zoo.train_and_save("mlp", "digits", seed=0, root=tmp_zoo, recipe=FAST, progress=False)
    path = tmp_zoo / "mlp-digits-s0.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(zoo.ChecksumError, match="sha256"):
        zoo.load("mlp", "digits", seed=0, root=tmp_zoo, train_if_missing=False)


def test_missing_checkpoint_error_says_how(tmp_zoo):
    with pytest.raises(FileNotFoundError, match="train_if_missing=True"):
        zoo.load("mlp", "digits", seed=9, root=tmp_zoo, train_if_missing=False)


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_carrying_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    with open(evil, "wb") as f:
        pickle.dump({"w": Payload(marker)}, f)
    with pytest.raises(ValueError, match="refused"):
        zoo.read_state_dict(evil)
    assert not marker.exists()


def test_plain_tensor_pt_checkpoint_is_read(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(zoo.read_state_dict(tmp_path / "ok.pt")["w"], torch.ones(2))


@pytest.mark.parametrize("edit, error, match", [
    (lambda e: e.update(sha256=None), zoo.ChecksumError, "no valid sha256"),
    (lambda e: e.pop("sha256"), zoo.ChecksumError, "no valid sha256"),
    (lambda e: e.update(sha256="00"), zoo.ChecksumError, "no valid sha256"),
])
def test_manifest_without_a_checksum_never_loads(tmp_zoo, edit, error, match):
    zoo.train_and_save("mlp", "digits", seed=0, root=tmp_zoo, recipe=FAST, progress=False)
    path = tmp_zoo / "mlp-digits-s0.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # corrupted AND unverifiable: must not load
    path.write_bytes(bytes(raw))
    meta = tmp_zoo / "mlp-digits-s0.json"
    entry = json.loads(meta.read_text())
    edit(entry)
    meta.write_text(json.dumps(entry))
    with pytest.raises(error, match=match):
        zoo.load("mlp", "digits", seed=0, root=tmp_zoo, train_if_missing=False)


def test_manifest_that_is_not_json_names_the_file(tmp_zoo):
    zoo.train_and_save("mlp", "digits", seed=0, root=tmp_zoo, recipe=FAST, progress=False)
    (tmp_zoo / "mlp-digits-s0.json").write_text("{not json")
    with pytest.raises(ValueError, match="mlp-digits-s0.json is not valid JSON"):
        zoo.load("mlp", "digits", seed=0, root=tmp_zoo, train_if_missing=False)


@pytest.mark.parametrize("seed", [0.7, -1, True, "0", 1.5])
def test_bad_seeds_are_refused(tmp_zoo, seed):
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        zoo.load("mlp", "digits", seed=seed, root=tmp_zoo, train_if_missing=False)


def test_committed_transformer_loads_and_scores_like_the_mlp():
    model, bundle = pl.zoo.load("vit", "mnist1d", seed=0, train_if_missing=False)
    entry = json.loads((pl.paths.ZOO / "vit-mnist1d-s0.json").read_text())
    acc = pl.train.evaluate(model, bundle.test)["accuracy"]
    assert acc == pytest.approx(entry["metrics"]["test_accuracy"], abs=1e-6) and acc > 0.7
    x, y = bundle.batch("train", n=64, seed=0)
    res = pl.prune(model, "qm", sparsity=0.5, stages=2, batch=(x, y))
    assert res.history["sparsity"].iloc[-1] == pytest.approx(0.5, abs=1e-3)
