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
# # Revisiting loss modelling: stages π, step-size penalty λ, and what survives fine-tuning
#
# This notebook follows *Revisiting Loss Modelling for Unstructured Pruning* (the LM paper). Criteria
# model the loss change of removing a weight: OBD ½·G_kk·θ² (Eq. 3), QM −g·θ + ½·G_kk·θ² (Eq. 5) and
# LM g·θ (Eq. 6), with G the exact Gauss-Newton diagonal; MP (|θ|) is the baseline. The models are
# local, so the paper prunes in π stages and penalises large steps with λ/2·θ².
#
# 1. **A sweep** over criteria × π × λ × seeds, each run fine-tuned with the original recipe,
#    stored in SQLite (re-running skips finished runs), and **the paper's figures**: ΔL vs λ per
#    π (Fig. 1), ΔL and ‖Δθ‖ per stage (Fig. 2), ΔL vs the validation-error gap after fine-tuning
#    with Spearman's ρ (Fig. 3), and accuracy vs fraction of weights remaining (LAP paper Fig. 3).
# 2. **The explorer**: sliders for sparsity, λ, π and the criterion on the pretrained MLP.

# %% tags=["parameters"]
import os

# Parameters (papermill style). FAST=1 is the small setting the test suite and Voilà demos use.
FAST = int(os.environ.get("PRUNELAB_FAST", "0"))
SPARSITY = 0.9
WORKERS = 2

# %%
import pandas as pd
import prunelab as pl

if FAST:
    SEEDS, STAGES, LAMS = [0], [1, 5], [0.0, 1e-2]
    CRITERIA, FINETUNE, TRAJECTORY_STAGES, WORKERS = ["lm", "qm"], {"epochs": 1}, 14, 0
else:
    SEEDS, STAGES, LAMS = [0, 1, 2, 3, 4], [1, 14, 140], [0.0, 1e-3, 1e-2, 1e-1, 1.0]
    CRITERIA, FINETUNE, TRAJECTORY_STAGES = ["lm", "qm", "obd"], "recipe", 140
STORE = pl.paths.RESULTS / ("01_loss_modelling_fast.sqlite" if FAST else "01_loss_modelling.sqlite")
model, bundle = pl.zoo.load("mlp", "mnist1d", seed=0)
pl.train.evaluate(model, bundle.val)

# %% [markdown]
# ## 1. The sweep
#
# Every run loads the pretrained model of its seed, prunes it to the target sparsity with its
# criterion, π and λ (global, exponential schedule, 1,000 training examples for the criteria),
# measures ΔL = |L(θ+Δθ) − L(θ)| on that batch and the validation error, fine-tunes with the
# original recipe and measures again. MP does not depend on λ or π, so it runs once per seed.

# %%
grid = pl.experiments.Sweep(arch="mlp", dataset="mnist1d", seed=SEEDS, criterion=CRITERIA,
                            sparsity=SPARSITY, stages=STAGES, lam=LAMS, schedule="exponential",
                            finetune=FINETUNE, examples=1000)
baseline = pl.experiments.Sweep(arch="mlp", dataset="mnist1d", seed=SEEDS, criterion="mp",
                                sparsity=SPARSITY, finetune=FINETUNE, examples=1000)
frame = pd.concat([baseline.run(store=STORE, workers=WORKERS),
                   grid.run(store=STORE, workers=WORKERS)], ignore_index=True)
print(len(frame), "runs")
frame[["criterion", "seed", "stages", "lam", "delta_loss", "val_error_gap", "val_error_gap_ft"]].head()

# %% [markdown]
# ### Best λ and π per criterion (LM paper Tables 1–2: mean ± std over seeds)

# %%
best_dl = pl.metrics.best_over(frame, over=("lam", "stages"), by=("criterion",), value="delta_loss")
best_ft = pl.metrics.best_over(frame, over=("lam", "stages"), by=("criterion",), value="val_error_gap_ft")
best_dl, best_ft

# %% [markdown]
# ### Fig. 1: ΔL vs λ, one line per π; MP dashed

# %%
pl.plots.delta_loss_vs_lambda(frame)

# %% [markdown]
# ### Fig. 2: ΔL and ‖Δθ‖ along the stages, linear vs exponential schedule (QM, seed 0)

# %%
x, y = bundle.batch("train", n=1000, seed=0)
histories = []
for schedule in ("linear", "exponential"):
    r = pl.prune(model, "qm", sparsity=SPARSITY, stages=TRAJECTORY_STAGES, schedule=schedule,
                 batch=(x, y))
    histories.append(r.history.assign(schedule=schedule, criterion="qm"))
history = pd.concat(histories, ignore_index=True)
pl.plots.stage_trajectories(history, color="schedule")

# %% [markdown]
# ### Fig. 3: does preserving the loss predict the fine-tuned result?
#
# One point per run; ρ is Spearman's rank correlation with a bootstrap 95 % interval over runs.

# %%
rho = pl.metrics.spearman(frame, x="delta_loss", y="val_error_gap_ft")
print(rho)
pl.plots.delta_loss_scatter(frame, x="delta_loss", y="val_error_gap_ft")

# %% [markdown]
# ### Accuracy vs fraction of weights remaining (one-shot, before fine-tuning; mean ± std over seeds)

# %%
curves = []
for seed in SEEDS:
    m, b = pl.zoo.load("mlp", "mnist1d", seed=seed)
    c = pl.experiments.accuracy_curve(m, b, criteria=["mp", "lap", "qm"], seed=seed,
                                      sparsities=[0.5, 0.8, 0.9, 0.95] if FAST else
                                      [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    curves.append(c.assign(seed=seed))
curves = pd.concat(curves, ignore_index=True)
pl.plots.accuracy_vs_density(curves, title="MLP on MNIST-1D, one-shot, no fine-tuning")

# %%
# Static figures for papers: figures/01_*.{pdf,png}
pl.figures.save(pl.figures.delta_loss_vs_lambda(frame), "01_fig1_delta_loss_vs_lambda",
                final=not FAST)
pl.figures.save(pl.figures.stage_trajectories(history, hue="schedule"),
                "01_fig2_stage_trajectories", final=not FAST)
pl.figures.save(pl.figures.delta_loss_scatter(frame, x="delta_loss", y="val_error_gap_ft"),
                "01_fig3_delta_loss_vs_finetuned", final=not FAST)
pl.figures.save(pl.figures.accuracy_vs_density(curves, chance=1 / bundle.num_classes),
                "01_accuracy_vs_density", final=not FAST)

# %% [markdown]
# ## 2. The explorer
#
# (Placed after the sweep: a cell runs only when the one before it is done, so an explorer
# above a 25-minute sweep would sit frozen through Run All.)
#
# Move the fraction of weights remaining: for a one-shot criterion the scores are cached, so each
# move only thresholds and evaluates. For π > 1 press *Run* (and *Cancel* to stop between stages).

# %%
explorer = pl.widgets.PruningExplorer(model, bundle)
explorer
