"""Pretrained models: trained once with a recorded recipe, cached, verified on every load.

A checkpoint is two files under ``data/zoo/``: ``{arch}-{dataset}-s{seed}.safetensors`` (a plain
state dict; safetensors never runs code) and ``{arch}-{dataset}-s{seed}.json``, its manifest entry
(architecture, dataset, seed, recipe, validation and test metrics, sha256 of the weights, torch
version, training time). Loading checks the sha256 before anything is read into a model, so a
corrupted or swapped file is refused whole. Files are written to a temporary name and renamed, so
two processes training the same model never leave a half-written checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from prunelab import data as D
from prunelab import models as M
from prunelab import paths
from prunelab.train import Recipe, evaluate, fit

__all__ = ["load", "key", "RECIPES", "recipe_for", "train_and_save", "manifest", "read_manifest",
           "read_state_dict", "sha256", "check_seed", "ChecksumError"]


def __dir__():
    return sorted(__all__)


# Recipes follow the papers (LM paper App. B: SGD, momentum 0.9, weight decay 5e-4, batch 100,
# early stopping on validation; LAP paper App. A: Adam, batch 60, lr 1.2e-3 for FCN and 3e-4 for
# the others, no weight decay), with epoch counts cut to what two CPU cores train in minutes.
_SGD_LM = Recipe(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=100,
                 epochs=200, patience=20)
_ADAM_FCN = Recipe(optimizer="adam", lr=1.2e-3, batch_size=60, epochs=40, patience=6)
_ADAM_CONV = Recipe(optimizer="adam", lr=3e-4, batch_size=60, epochs=30, patience=5)

RECIPES: dict[tuple[str, str], Recipe] = {
    ("mlp", "mnist1d"): _SGD_LM,
    ("mlp", "digits"): _SGD_LM.replace(epochs=100),
    ("mlp", "fashion-mnist"): _SGD_LM.replace(epochs=60, patience=8),
    ("mlp", "mnist"): _SGD_LM.replace(epochs=60, patience=8),
    ("fcn", "fashion-mnist"): _ADAM_FCN,
    ("fcn", "mnist"): _ADAM_FCN,
    ("fcn", "mnist1d"): _ADAM_FCN.replace(epochs=100, patience=15),
    # The small ViT (Round 2): Adam at 1e-3 as ViT training on small data does, early stopping.
    ("vit", "mnist1d"): Recipe(optimizer="adam", lr=1e-3, batch_size=100, epochs=150,
                               patience=20),
}


def recipe_for(arch: str, dataset: str) -> Recipe:
    """The recorded training recipe of ``arch`` on ``dataset`` (a paper-style default otherwise)."""
    if (arch, dataset) in RECIPES:
        return RECIPES[(arch, dataset)]
    if arch == "mlp":
        return _SGD_LM.replace(epochs=60, patience=8)
    if arch == "fcn":
        return _ADAM_FCN
    small = dataset in ("mnist1d", "digits")
    return _ADAM_CONV.replace(epochs=100 if small else 30, patience=15 if small else 5)


class ChecksumError(ValueError):
    """A checkpoint's bytes do not match the sha256 recorded in its manifest."""


def check_seed(seed) -> int:
    """``seed`` as an int >= 0 (numpy integers accepted), or ValueError naming the value."""
    import numbers

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def key(arch: str, dataset: str, seed: int) -> str:
    """File stem of a checkpoint, e.g. ``mlp-mnist1d-s0``."""
    return f"{arch}-{dataset}-s{check_seed(seed)}"


def read_manifest(path: Path) -> dict:
    """A checkpoint's manifest entry; ValueError naming the file when it is not a JSON object,
    ChecksumError when it has no sha256 (verification is never optional)."""
    try:
        entry = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"zoo manifest {path} is not valid JSON ({err}); delete it and the "
                         f"checkpoint beside it to retrain") from err
    if not isinstance(entry, dict):
        raise ValueError(f"zoo manifest {path} must hold a JSON object, got "
                         f"{type(entry).__name__}")
    digest = entry.get("sha256")
    if not (isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)):
        raise ChecksumError(f"zoo manifest {path} has no valid sha256 (got {digest!r}): the "
                            f"checkpoint cannot be verified and is not loaded; delete both files "
                            f"to retrain")
    return entry


def _zoo_dir(root: Path | None) -> Path:
    return Path(root) if root is not None else paths.ZOO


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; checkpoints are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_state_dict(path: str | Path, *, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or a ``.pt`` file loaded with ``weights_only``.

    Never unpickles arbitrary objects: a pickle that carries code is refused.

    Raises:
        ChecksumError: the file's sha256 differs from ``expected_sha256``.
        ValueError: the file is not a readable state dict (corrupted, or a refused pickle).
    """
    path = Path(path)
    if expected_sha256 is not None:
        found = sha256(path)
        if found != expected_sha256:
            raise ChecksumError(f"checkpoint {path} is corrupted or was replaced: sha256 {found} "
                                f"!= {expected_sha256} recorded in its manifest; delete it to "
                                f"retrain it, nothing was loaded")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise many types for bad files
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}. "
                         f"Only safetensors files and plain tensor state dicts are accepted; "
                         f"pickles carrying code are refused.") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a state dict of tensors")
    return state


def manifest(root: Path | None = None) -> pd.DataFrame:
    """One row per checkpoint in the zoo: arch, dataset, seed, metrics, sha256, file."""
    rows = []
    for p in sorted(_zoo_dir(root).glob("*.json")):
        entry = read_manifest(p)
        flat = {k: v for k, v in entry.items() if k not in ("recipe", "metrics")}
        flat.update({f"{k}": v for k, v in entry.get("metrics", {}).items()})
        flat["present"] = (p.parent / entry["file"]).exists()
        rows.append(flat)
    return pd.DataFrame(rows)


def load(arch: str, dataset: str, seed: int = 0, *, train_if_missing: bool = True,
         root: Path | None = None, progress: bool = True) -> tuple[nn.Module, "D.Bundle"]:
    """A pretrained ``arch`` on ``dataset`` and the dataset bundle, from the zoo's cache.

    Args:
        arch: a name from :func:`prunelab.models.names`.
        dataset: a name from :func:`prunelab.data.names`.
        seed: training seed (weight init and data order).
        train_if_missing: train with the recorded recipe when the checkpoint is not cached
            (with a progress bar); when False, a missing checkpoint raises FileNotFoundError.
        root: zoo folder (default ``data/zoo``).
        progress: show the training progress bar.

    Returns:
        ``(model, bundle)``, the model in eval mode.

    Raises:
        ChecksumError: the cached file does not match its manifest (nothing is loaded).
    """
    seed = check_seed(seed)
    bundle = D.load(dataset)
    model = M.build(arch, bundle, seed=seed)
    stem = key(arch, dataset, seed)
    folder = _zoo_dir(root)
    meta_path, weights_path = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    if not (meta_path.exists() and weights_path.exists()):
        if not train_if_missing:
            raise FileNotFoundError(
                f"no pretrained {stem} in {folder}; call pl.zoo.load({arch!r}, {dataset!r}, "
                f"seed={seed}, train_if_missing=True) or `python -m prunelab.zoo ensure {arch} "
                f"{dataset} --seed {seed}` to train it with its recorded recipe")
        train_and_save(arch, dataset, seed, root=folder, progress=progress)
    entry = read_manifest(meta_path)
    state = read_state_dict(weights_path, expected_sha256=entry["sha256"])
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"checkpoint {weights_path} does not fit {arch} on {dataset}: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state)
    model.eval()
    return model, bundle


def train_and_save(arch: str, dataset: str, seed: int = 0, *, root: Path | None = None,
                   recipe: Recipe | None = None, progress: bool = True) -> dict:
    """Train ``arch`` on ``dataset`` with its recipe and write checkpoint + manifest entry.

    Returns:
        The manifest entry (also written as JSON beside the weights).
    """
    from safetensors.torch import save_file

    bundle = D.load(dataset)
    recipe = recipe or recipe_for(arch, dataset)
    model = M.build(arch, bundle, seed=seed)
    t0 = time.perf_counter()
    result = fit(model, bundle.train, recipe=recipe, val=bundle.val, seed=seed,
                 progress=progress, desc=f"train {key(arch, dataset, seed)}")
    if result.interrupted:
        raise KeyboardInterrupt(f"training of {key(arch, dataset, seed)} was interrupted; "
                                f"nothing was written")
    seconds = time.perf_counter() - t0
    val, test = evaluate(model, bundle.val), evaluate(model, bundle.test)
    folder = _zoo_dir(root)
    stem = key(arch, dataset, seed)
    weights_path = folder / f"{stem}.safetensors"
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write(weights_path, lambda tmp: save_file(state, tmp))
    entry = {
        "arch": arch, "dataset": dataset, "seed": int(seed), "file": weights_path.name,
        "sha256": sha256(weights_path), "recipe": recipe.to_dict(),
        "metrics": {"val_loss": val["loss"], "val_accuracy": val["accuracy"],
                    "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                    "best_epoch": result.best_epoch, "epochs_run": int(len(result.history))},
        "train_seconds": round(seconds, 1), "torch": torch.__version__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    text = json.dumps(entry, indent=1, sort_keys=True) + "\n"
    _atomic_write(folder / f"{stem}.json", lambda tmp: Path(tmp).write_text(text))
    return entry


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prunelab.zoo",
                                     description="Train, check and list pretrained models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ensure = sub.add_parser("ensure", help="load a checkpoint, training it first if missing")
    ensure.add_argument("arch")
    ensure.add_argument("dataset")
    ensure.add_argument("--seed", type=int, default=0)
    sub.add_parser("list", help="print the manifest")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        print(manifest().to_string(index=False))
        return 0
    t0 = time.perf_counter()
    model, bundle = load(args.arch, args.dataset, args.seed)
    test = evaluate(model, bundle.test)
    print(f"{key(args.arch, args.dataset, args.seed)}: test accuracy {test['accuracy']:.4f} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
