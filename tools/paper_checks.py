"""Numbers the issues ask for, reproduced from the papers' claims on our pretrained models.

    python tools/paper_checks.py [lap] [qm]

lap: LAP vs MP test accuracy of the pretrained FCN on Fashion-MNIST before fine-tuning, at the LAP
     paper's layerwise sparsities ((p, q) = (0, 0.5), App. A), as in its Fig. 3d.
qm:  ΔL of QM with π = 1 vs π = 14 (exponential) on the same FCN (LM paper Fig. 1).
"""
import sys

import pandas as pd
import torch

import prunelab as pl

torch.set_num_threads(1)


def lap_vs_mp():
    model, bundle = pl.zoo.load("fcn", "fashion-mnist", seed=0)
    rows = []
    for tau in range(1, 8):
        layer_sparsity = pl.masks.lap_layer_sparsity(model, tau, p=0.0, q=0.5)
        for crit in ("mp", "lap"):
            r = pl.prune(model, crit, layer_sparsity=layer_sparsity)
            acc = pl.train.evaluate(r.model, bundle.test)["accuracy"]
            rows.append({"tau": tau, "remaining": 1 - pl.masks.sparsity(r.masks),
                         "criterion": crit, "test_accuracy": acc})
    frame = pd.DataFrame(rows).pivot(index=["tau", "remaining"], columns="criterion",
                                     values="test_accuracy")
    print("FCN / Fashion-MNIST, test accuracy before fine-tuning (LAP paper App. A sparsities)")
    print(frame.round(4).to_string())


def qm_stages():
    model, bundle = pl.zoo.load("fcn", "fashion-mnist", seed=0)
    batch = bundle.batch("train", n=1000, seed=0)
    rows = []
    for sparsity in (0.9, 0.98):
        for crit, stages in (("mp", 1), ("qm", 1), ("qm", 14)):
            r = pl.prune(model, crit, sparsity=sparsity, stages=stages, schedule="exponential",
                         batch=batch)
            rows.append({"criterion": crit, "sparsity": sparsity, "stages": stages,
                         "delta_loss": r.history.delta_loss.iloc[-1],
                         "test_accuracy": pl.train.evaluate(r.model, bundle.test)["accuracy"]})
    print("FCN / Fashion-MNIST, MP and QM, global, exponential schedule, 1000-example batch")
    print(pd.DataFrame(rows).round(4).to_string(index=False))


if __name__ == "__main__":
    which = sys.argv[1:] or ["lap", "qm"]
    if "lap" in which:
        lap_vs_mp()
    if "qm" in which:
        qm_stages()
