# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # prunelab tour: pruning a pretrained MLP
#
# We load the default pretrained model (the LM paper's MLP, 300-100 tanh, trained on the embedded
# MNIST-1D data), prune it one-shot at several sparsities without fine-tuning, and plot test accuracy
# against the fraction of weights that remain. Everything here is a library call; the notebook only
# wires them together.

# %% tags=["parameters"]
# Parameters (papermill style): FAST=1 runs in seconds for the test suite.
FAST = 0
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]

# %%
import prunelab as pl

model, bundle = pl.zoo.load("mlp", "mnist1d", seed=0)
print(model)
pl.train.evaluate(model, bundle.test)

# %% [markdown]
# ## One-shot pruning at several sparsities
#
# `pl.prune` returns a pruned *copy* (the pretrained model is never modified) with its masks and a
# per-stage history. Global magnitude pruning (`mp`, Han et al. 2015) ranks all weights together;
# `lap` is lookahead pruning (Park et al. 2020, Eq. 5), which also looks at the neighbouring layers;
# `random` is the baseline every comparison should include.

# %%
criteria = ["mp", "random"] if FAST else ["mp", "lap", "random"]
sparsities = SPARSITIES[::2] if FAST else SPARSITIES
frame = pl.experiments.accuracy_curve(model, bundle, criteria=criteria, sparsities=sparsities)
frame[["criterion", "sparsity", "density", "accuracy", "loss"]].round(4)

# %%
fig = pl.plots.accuracy_vs_density(frame, chance=1 / bundle.num_classes,
                                   title="MLP on MNIST-1D, one-shot pruning, no fine-tuning")
fig

# %% [markdown]
# Where did the pruning go? Global magnitude pruning removes weights unevenly across layers:

# %%
result = pl.prune(model, "mp", sparsity=0.9)
pl.masks.density(result.masks)

# %%
# Static copy for papers and slides: figures/00_tour_accuracy_vs_density.{pdf,png}
pl.figures.save(pl.figures.accuracy_vs_density(frame, chance=1 / bundle.num_classes),
                "00_tour_accuracy_vs_density", final=not FAST)

# %% [markdown]
# ## Next
#
# - `01_loss_modelling.ipynb`: the slider explorer and the LM paper's sweeps (λ, stages π, ΔL vs fine-tuned).
# - `make lab` opens JupyterLab on `notebooks/`.
