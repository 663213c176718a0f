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
# # Mean replacement: pruning whole units, and what it costs
#
# *Mean Replacement Pruning* (MRP, ICLR 2019 submission) prunes whole units (the neurons of a
# dense layer, the channels of a convolution). Removing a unit drops its output from the next
# layer. **Mean replacement** (`bp_`, "bias propagation") keeps the unit's average contribution:
# the unit's mean output, over a batch and over positions, times its outgoing weights, is added to
# the next layer's bias (MRP Eq. 4). MRP Sec. 3.3 shows this is the best constant replacement
# for a linear consumer.
#
# Here we train a `small_conv` (MRP App. 6.3) on Fashion-MNIST. Every few hundred steps we pause,
# prune a copy with each of the 12 scores of MRP Table 1, and measure the **pruning penalty**
# L(pruned) − L(dense) on a fixed sample of training images. We do this for the layer sets of MRP
# Table 2: all layers at once, or only the first, middle or last conv, or the first dense layer.
# The scores are: `rand`; `norm` (the norm of the unit's weights); `rs` and `abs_rs`, the
# first-order Taylor estimate of the loss change when the unit is removed, signed and absolute;
# `mrs` and `abs_mrs`, the same estimate for mean replacement. Each also comes with `bp_` (mean
# replacement applied after pruning).
#
# At the end, `UnitExplorer` lets you prune the trained network yourself. We also compare the
# channel criteria of the LAP paper (App. H) and of the lecture slides (HRank, polarization).

# %% tags=["parameters"]
import os

# Parameters (papermill style). FAST=1 is the small setting the test suite uses.
FAST = int(os.environ.get("PRUNELAB_FAST", "0"))
ARCH = "small_conv"
DATASET = "fashion-mnist"
FRACTION = 0.1  # fraction of the units of each chosen layer pruned at every measurement

# %%
import pandas as pd
import torch
import prunelab as pl

SEEDS = (0,) if FAST else (0, 1)
STEPS = 40 if FAST else 3000          # training steps (batch 64)
EVERY = 20 if FAST else 250           # measure the penalties every EVERY steps (MRP: 250)
SAMPLE = 100 if FAST else 500         # fixed sample of training images for the penalties
FINETUNE = 2 if FAST else 10          # MRP Fig. 4: penalty again after N fine-tuning steps
FRACTIONS = (FRACTION,) if FAST else (FRACTION, 0.3)
LAYER_SETS = ["all", "midconv"] if FAST else None  # None: all, firstconv, midconv, lastconv, firstdense
TEST_N = 300 if FAST else None        # test images for the one-shot tables (None: all)

try:
    bundle = pl.data.load(DATASET)
except pl.data.DatasetNotAvailable as err:
    if not FAST:
        raise
    # A fresh machine without Debian's dataset-fashion-mnist: the quick run uses the embedded
    # digits instead, and says so; the full run needs the real data.
    print(f"{DATASET} is not available here ({err}); this FAST run uses 'digits' instead")
    DATASET = "digits"
    bundle = pl.data.load(DATASET)
test = bundle.test if TEST_N is None else bundle.batch("test", n=TEST_N, seed=0)
recipe = pl.train.Recipe(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=64, epochs=100,
                         max_steps=STEPS)
studies = {}
for seed in SEEDS:
    model = pl.models.build(ARCH, bundle, seed=seed)
    studies[seed] = pl.mrp.penalty_study(
        model, bundle, recipe=recipe, layer_sets=LAYER_SETS, fractions=FRACTIONS,
        every=EVERY, sample=SAMPLE, finetune_steps=FINETUNE, finetune_lr=1e-3, seed=seed)
frame = pd.concat([s.frame for s in studies.values()], ignore_index=True)
trained = studies[SEEDS[0]].model
print(f"{len(frame)} measurements; test accuracy after training (seed {SEEDS[0]}): "
      f"{pl.train.evaluate(trained, test)['accuracy']:.3f}")
frame.head()

# %% [markdown]
# ## Penalties during training (MRP Fig. 2)
#
# One experiment: seed 0, all layers pruned at once. A solid line is a score with mean
# replacement (`bp_`); the dashed line of the same colour is the score without it. A negative
# penalty means the pruned network has a lower loss than the dense one.

# %%
one = frame[(frame.seed == SEEDS[0]) & (frame.layer_set == "all") & (frame.fraction == FRACTION)]
pl.plots.penalty_over_training(one, title=f"{ARCH} on {DATASET}: {FRACTION:.0%} of the units of "
                               "every layer pruned")

# %% [markdown]
# ## With vs without mean replacement (MRP Fig. 3)
#
# Each point is one measurement of one score: its penalty without mean replacement (x) and with
# it (y). Points below the line y = x are measurements where mean replacement lowered the
# penalty.
#
# Mean replacement always makes the next layer's pre-activations closer to the dense ones: their
# average shift becomes exactly zero and their squared error drops (MRP Sec. 3.3; the tests
# check this). It does not always lower the *loss*, because there are nonlinearities after that
# layer. It helps most where the penalty is large: the signed scores `rs` and `mrs` select units
# whose removal changes the loss a lot. The absolute-valued scores select units whose removal
# hardly matters, so their penalties are close to zero and the comparison is mostly noise.
#
# In the full run (two seeds, 1,440 pairs) mean replacement lowered the penalty in 60 % of the
# pairs; MRP reports almost all of them on CIFAR-10. It helped in 65–71 % of the pairs when the
# first conv, the last conv or the first dense layer was pruned, but in only 44 % for the middle
# conv. A spot check (seed 0, end of training, 30 % of the middle conv's channels) found the
# library's `bp_` loss equal to that of the dense model with the pruned channels replaced by their
# mean on the way into the next conv, so this is how the network behaves, not a bookkeeping
# error. Replacing them by a mean per position instead of per channel helped `rs` there and was
# worse for `rand`, `norm` and `abs_mrs`.

# %%
pairs = pl.mrp.bp_pairs(frame)
below = pd.concat({
    "all measurements": pd.Series({"below y = x": pairs.below.mean(), "points": len(pairs)}),
    **{f"layers: {k}": pd.Series({"below y = x": g.below.mean(), "points": len(g)})
       for k, g in pairs.groupby("layer_set")},
    **{f"fraction: {k}": pd.Series({"below y = x": g.below.mean(), "points": len(g)})
       for k, g in pairs.groupby("fraction")},
    **{f"score: {k}": pd.Series({"below y = x": g.below.mean(), "points": len(g)})
       for k, g in pairs.groupby("base")}}, axis=1).T
below["points"] = below["points"].astype(int)
below.round(3)

# %%
pl.plots.penalty_scatter(pairs, title=f"Pruning penalty with vs without mean replacement: "
                         f"{pairs.below.mean():.0%} of {len(pairs)} points below y = x")

# %% [markdown]
# ## After fine-tuning (MRP Fig. 4)
#
# Each pruned copy is then fine-tuned for a few SGD steps (mini-batches of 64 from the fixed
# sample, learning rate 1e-3) and its penalty is measured again. MRP reports that the advantage of
# mean replacement shrinks as fine-tuning goes on, but is still visible after 500 steps.

# %%
pairs_ft = pl.mrp.bp_pairs(frame, value="penalty_ft")
pl.plots.penalty_scatter(pairs_ft, title=f"After {FINETUNE} fine-tuning steps: "
                         f"{pairs_ft.below.mean():.0%} of points below y = x")

# %% [markdown]
# ## Performance profiles of the 12 scores (MRP Sec. 4.3, Fig. 5)
#
# For each measurement j (a seed, layer set and training step), the threshold is
# t_j = τ·(best penalty) + (1 − τ)·(worst penalty) over the 12 scores. A score's curve p(τ) is
# the fraction of measurements where its penalty is strictly below t_j. A higher curve is a
# better score: at τ = 0 it counts how often a score beats the worst one, and near τ = 1 how
# often it is (almost) the best. The table gives the area under each curve. In the full run
# the absolute-valued scores (area ≈ 0.94) beat the signed ones (≈ 0.42), and every `bp_` curve
# lies above its plain one, as in MRP Sec. 4.3 and Fig. 5.

# %%
profile = pl.mrp.penalty_profile(frame)
area = profile.groupby("method").fraction.mean().sort_values(ascending=False)
signed = {s: area[s] for s in area.index if s.removeprefix("bp_") in ("rs", "mrs")}
absolute = {s: area[s] for s in area.index if s.removeprefix("bp_") in ("abs_rs", "abs_mrs")}
print(f"mean area, absolute-valued scores {sum(absolute.values()) / len(absolute):.3f} vs "
      f"signed {sum(signed.values()) / len(signed):.3f}")
area.rename("area under the profile").round(3).to_frame()

# %%
pl.plots.performance_profile(profile, pair_prefix="bp_",
                             title="Performance profiles of the 12 scores (penalty, no fine-tuning)")

# %% [markdown]
# ## Which units do the scores pick? (MRP Figs. 6b and 7)
#
# This uses the middle convolution (MRP uses the second conv of MEDIUM_CONV), with the fraction
# `FRACTION` of its channels pruned at every measurement. The histogram shows the mean
# squared activation of the channels each score selected, over all measurements. The second plot
# shows how many distinct channels a score has picked so far, as a fraction of the layer: a
# consistent score keeps choosing the same few channels, while `rand` eventually touches almost
# all of them. MRP's Fig. 7b counts only the second half of training; we do the same.

# %%
mid = studies[SEEDS[0]]
acts = mid.activations("midconv", FRACTION)
pl.plots.activation_histogram(acts, scores=["rand", "norm", "abs_rs", "abs_mrs", "rs", "mrs"],
                              title="E[a²] of the channels selected in the middle conv")

# %%
since = STEPS // 2
consistency = mid.consistency("midconv", FRACTION, since=since)
pl.plots.selection_consistency(consistency, title=f"Channels ever selected since step {since}")

# %% [markdown]
# ## Try it: prune the trained network yourself
#
# Pick a layer set, a score and the fraction of units. Each move prunes a copy twice, once with
# units removed and once with mean replacement, and shows both penalties on 500 validation
# images and the sorted scores of the set's first layer (red = pruned). The channel criteria of
# the LAP paper (App. H: `mp-l1/l2` are ℓ1/ℓ2 norms of a channel's weights, `lap-l1/l2` the same
# norms of its LAP scores) and HRank (the average rank of a channel's feature maps) are in the
# same list. HRank needs conv layers: choose `firstconv`, `midconv` or `lastconv`.

# %%
pl.widgets.UnitExplorer(trained, bundle, fraction=FRACTION)

# %% [markdown]
# ## Channel criteria, one-shot (LAP paper App. H; HRank)
#
# Every conv layer of the trained network is pruned once by each criterion, at several fractions,
# with and without mean replacement, and evaluated on the test split without fine-tuning. App. H
# of the LAP paper reports errors after retraining; these numbers are before it.

# %%
convs = pl.mrp.layer_sets(trained)
conv_layers = [convs["firstconv"][0]] + [n for n in convs["all"] if n.startswith("features")][1:]
channel = pl.structured.compare(
    trained, criteria=["random", "mp-l1", "mp-l2", "lap-l1", "lap-l2", "hrank"],
    fractions=(0.1, 0.3, 0.5) if not FAST else (0.3,), layers=conv_layers,
    batch=bundle.batch("train", n=SAMPLE, seed=0), eval_data=test)
channel.pivot_table(index=["criterion", "mean_replacement"], columns="fraction",
                    values="accuracy").round(3)

# %% [markdown]
# ## Polarization (Zhuang et al. 2020): train so that pruning is a threshold
#
# The polarization regulariser t‖γ‖₁ − ‖γ − γ̄‖₁ on the BatchNorm scales γ pushes each γ
# either to 0 or away from the layer mean. Units with γ ≈ 0 can then be cut with a single
# threshold at the gap. We train the BN version of the network with and without the
# regulariser and look at the |γ| values.

# %%
import plotly.express as px

LAM, T = 1e-2, 1.2  # λ and t of the regulariser; larger t prunes more
bn_recipe = recipe.replace(max_steps=60 if FAST else 1500)
nets = {}
for name, reg in (("plain", None), ("polarized", pl.structured.polarization_regularizer(LAM, T))):
    net = pl.models.build(ARCH, bundle, seed=0, bn=True)
    pl.train.fit(net, bundle.train, recipe=bn_recipe, seed=0, progress=False, regularizer=reg)
    nets[name] = net
gamma = pd.concat([pd.DataFrame({"training": name, "layer": layer, "abs_gamma": g.numpy()})
                   for name, net in nets.items()
                   for layer, g in pl.structured.gammas(net).items()], ignore_index=True)
px.histogram(gamma, x="abs_gamma", color="training", facet_col="layer", nbins=40,
             barmode="overlay", template="plotly_white", title="|γ| per BatchNorm layer")

# %%
polar = nets["polarized"]
threshold = pl.structured.polarization_threshold(polar)
convs_bn = [n for n in pl.mrp.layer_sets(polar)["all"] if n.startswith("features")]
cut = pl.structured.prune_by_threshold(polar, threshold, layers=convs_bn)
rows = [{"model": "polarized, dense", **pl.train.evaluate(polar, test)},
        {"model": f"polarized, |γ| < {threshold:.3g} pruned", **pl.train.evaluate(cut.model, test)},
        {"model": "plain", **pl.train.evaluate(nets["plain"], test)}]
print({k: f"{len(v)}/{cut.sizes[k]}" for k, v in cut.pruned.items()})
pd.DataFrame(rows).set_index("model")[["accuracy", "loss"]].round(3)

# %%
# Static figures: figures/02_*.{pdf,png}
pl.figures.save(pl.figures.penalty_over_training(one), "02_penalty_over_training", final=not FAST)
pl.figures.save(pl.figures.penalty_scatter(pairs), "02_bp_scatter", final=not FAST)
pl.figures.save(pl.figures.penalty_scatter(pairs_ft), "02_bp_scatter_finetuned", final=not FAST)
pl.figures.save(pl.figures.performance_profile(profile, pair_prefix="bp_"), "02_performance_profile", final=not FAST)
pl.figures.save(pl.figures.activation_histogram(acts, scores=["rand", "abs_mrs", "mrs"]),
                "02_selected_activations", final=not FAST)
pl.figures.save(pl.figures.selection_consistency(consistency), "02_selection_consistency", final=not FAST)
