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
# # Mode connectivity: straight lines, curves, and pruned networks
#
# Two MLPs trained on scikit-learn's 8×8 digits from different random seeds are two minima of the
# same loss. Along the **straight segment** between them the loss usually rises: the *barrier*
# (max along the path minus the mean of the endpoints; Frankle et al. 2020, *Linear mode
# connectivity and the lottery ticket hypothesis*) measures by how much. Garipov et al. 2018
# (*Loss surfaces, mode connectivity, and fast ensembling of DNNs*) train a **Bézier curve**
# φ_θ(t) = (1−t)² a + 2t(1−t) θ + t² b, with only the bend θ learned, along which the loss stays low.
# Finally two fine-tuned *pruned* copies sharing a mask are interpolated; the pruned entries stay
# exactly zero along the path.

# %% tags=["parameters"]
import os

# Parameters (papermill style). FAST=1 is the small setting the test suite uses.
FAST = int(os.environ.get("PRUNELAB_FAST", "0"))
SPARSITY = 0.8

# %%
import pandas as pd
import prunelab as pl

bundle = pl.data.load("digits")
recipe = pl.train.Recipe(epochs=3 if FAST else 40, lr=1e-3, batch_size=64)
STEPS = 9 if FAST else 31          # points along each path
BEND_STEPS = 150 if FAST else 2000  # optimiser steps of the Bézier bend

models = []
for seed in (0, 1):
    m = pl.models.build("mlp", bundle, seed=seed)
    pl.train.fit(m, bundle.train, recipe=recipe, seed=seed, progress=False)
    models.append(m)
a, b = models
pd.DataFrame([pl.train.evaluate(m, bundle.test) for m in models], index=["seed 0", "seed 1"])

# %% [markdown]
# ## Straight segment vs trained Bézier curve (Garipov et al. Fig. 2; Frankle et al. Fig. 1)
#
# Loss along t ∈ [0, 1] on the train and test splits; the legend gives each path's barrier.

# %%
segment = pl.connectivity.interpolate(a, b, bundle, steps=STEPS, splits=("train", "test"))
curve = pl.curves.bezier(a, b)
bend_history = pl.curves.fit_bend(curve, bundle.train, steps=BEND_STEPS, lr=1e-2)
bent = pl.curves.curve_frame(curve, bundle, steps=STEPS, splits=("train", "test"))
paths = pd.concat([segment.assign(path="segment"), bent.assign(path="bezier")],
                  ignore_index=True)
pl.plots.interpolation(paths, title="Loss between two MLPs trained from different seeds")

# %%
pl.plots.interpolation(paths, y="error", title="Error along the paths")

# %%
barriers = pd.DataFrame([
    {"path": p, "split": s, "loss barrier": pl.connectivity.barrier(f, split=s),
     "error barrier": pl.connectivity.barrier(f, metric="error", split=s)}
    for p, f in (("segment", segment), ("bezier", bent)) for s in ("train", "test")])
barriers.round(4)

# %% [markdown]
# ## Ensembles (Garipov et al. Sec. 5)
#
# The two endpoints averaged (softmax mean) usually beat each alone; so can an endpoint with the
# curve's midpoint φ(½).

# %%
test = bundle.test
pd.Series({
    "a alone": pl.train.evaluate(a, test)["error"],
    "b alone": pl.train.evaluate(b, test)["error"],
    "ensemble a + b": pl.curves.ensemble_error(a, b, test),
    "ensemble a + φ(½)": pl.curves.ensemble_error(a, curve.point(0.5), test),
}, name="test error").round(4)

# %% [markdown]
# ## Explore the curve
#
# Move t to evaluate the Bézier point φ(t) and the straight-line point on the test split.

# %%
import ipywidgets as widgets

slider = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="t")
label = widgets.Label()


def show(change=None):
    t = slider.value
    c = pl.train.evaluate(curve.point(t), test)
    s = pl.train.evaluate(pl.connectivity.lerp_model(a, b, t), test)
    label.value = (f"Bézier: loss {c['loss']:.3f}, error {c['error']:.3f} | "
                   f"segment: loss {s['loss']:.3f}, error {s['error']:.3f}")


slider.observe(show, names="value")
show()
widgets.VBox([slider, label])

# %% [markdown]
# ## Pruned networks (Frankle et al. 2020, Sec. 4: instability of sparse networks)
#
# Model a is pruned with global magnitude pruning, then two copies with the same mask are
# fine-tuned with different data orders. Both endpoints share the mask, so every interpolated
# network is as sparse as they are.

# %%
ft = recipe.replace(epochs=2 if FAST else 20)
pruned = [pl.prune(a, "mp", sparsity=SPARSITY, finetune=ft, train_data=bundle.train,
                   seed=seed).model for seed in (10, 11)]
sparse = pl.connectivity.interpolate(*pruned, bundle, steps=STEPS, splits=("train", "test"))
mid = pl.connectivity.lerp_model(*pruned, 0.5)
kept = sum(int((p != 0).sum()) for n, p in mid.named_parameters() if n.endswith("weight"))
total = sum(p.numel() for n, p in mid.named_parameters() if n.endswith("weight"))
print(f"weights nonzero at t = 0.5: {kept / total:.3f} (mask density {1 - SPARSITY:.2f})")
pl.plots.interpolation(sparse.assign(path=f"pruned {SPARSITY:.0%}"),
                       title="Two fine-tuned pruned networks (same mask)")

# %% [markdown]
# ## Instability vs the step k the copies split at (Frankle et al. 2020, Figs. 2–3)
#
# One network is trained for k steps. Two copies are then trained to the end with different data
# orders, and the straight segment between the two results is evaluated. The *instability* is
# that segment's test-error barrier. For ResNets and VGGs on CIFAR-10 and ImageNet, Frankle et
# al. find it large at k = 0 and close to zero once k passes a point early in training. From that
# point on, SGD noise no longer separates the two copies into different basins. LeNet on MNIST was
# stable from k = 0, and this small MLP on digits is too (a barrier of at most one or two test
# images at every k in the full run). Use k to pick the splitting step and t to move along the
# segment.

# %%
init = pl.models.build("mlp", bundle, seed=0)
total = recipe.total_steps(len(bundle.train))
ks = sorted({0, total // 80, total // 40, total // 20, total // 10, total // 4, total // 2})
barriers_k, paths_k = pl.lottery.instability_curve(init, bundle, ks=ks, recipe=recipe,
                                                        steps=STEPS)
pl.plots.instability(barriers_k, title=f"Instability of an MLP on digits ({total} steps in all)")

# %%
import plotly.graph_objects as go

k_slider = widgets.SelectionSlider(options=ks, value=ks[0], description="k")
t_slider = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=1 / (STEPS - 1),
                               description="t", readout_format=".2f")
path_fig = go.FigureWidget(
    data=[go.Scatter(x=[], y=[], mode="lines+markers", name="test error"),
          go.Scatter(x=[], y=[], mode="markers", marker=dict(size=14, color="red"), name="t")],
    layout=dict(xaxis_title="t", yaxis_title="test error", template="plotly_white",
                height=320, width=520, yaxis_range=[0, float(paths_k.error.max()) * 1.1]))
readout = widgets.Label()


def show_path(change=None):
    path = paths_k[paths_k.k == k_slider.value].sort_values("t")
    i = int(round(t_slider.value * (len(path) - 1)))
    with path_fig.batch_update():
        path_fig.data[0].x, path_fig.data[0].y = path.t.tolist(), path.error.tolist()
        path_fig.data[1].x, path_fig.data[1].y = [path.t.iloc[i]], [path.error.iloc[i]]
        path_fig.layout.title = f"split at k = {k_slider.value}"
    b = barriers_k.set_index("k").barrier[k_slider.value]
    readout.value = (f"k = {k_slider.value}: error at t = {path.t.iloc[i]:.2f} is "
                     f"{path.error.iloc[i]:.3f}; barrier {b:.3f}")


k_slider.observe(show_path, names="value")
t_slider.observe(show_path, names="value")
show_path()
widgets.VBox([widgets.HBox([k_slider, t_slider]), readout, path_fig])

# %% [markdown]
# ## Sparse subnetworks rewound to k (Frankle et al. 2020, Sec. 4, Figs. 5–6)
#
# The same question for pruned networks. Iterative magnitude pruning (IMP) finds a mask m on the
# trained network θ_T, *rewinds* the kept weights to their values θ_k at step k, and trains
# m ⊙ θ_k again. Frankle et al. find that at high sparsity a subnetwork rewound to k = 0 is
# unstable and misses the dense accuracy, while one rewound to a k early in training is stable and
# *matching*. Here m is one round of global magnitude pruning of θ_T; the two copies of m ⊙ θ_k
# are trained with m held, and the segment between them keeps m. The table gives each curve's
# barrier and the mean test error of its two copies. In the full run this MLP's subnetworks are as
# stable as the dense network at every k (barriers of at most two test images), like LeNet in the
# paper. What sparsity costs here is accuracy, not stability: with 10 % of the weights the copies
# reach about 3 % test error (dense about 2 %), with 2 % about 11 %.

# %%
REWIND_SPARSITIES = (0.9, 0.98)
curves = [barriers_k.assign(network="dense")]
for sp in REWIND_SPARSITIES:
    sparse_k, _ = pl.lottery.instability_curve(init, bundle, ks=ks, recipe=recipe,
                                                    steps=STEPS, sparsity=sp)
    curves.append(sparse_k.assign(network=f"{1 - sp:.0%} of weights, rewound to k"))
rewound = pd.concat(curves, ignore_index=True)
rewound["error"] = (rewound.error_a + rewound.error_b) / 2
rewound.pivot_table(index="network", columns="k", values=["barrier", "error"], sort=False).round(3)

# %%
pl.plots.instability(rewound, color="network",
                     title="Instability of dense and rewound sparse MLPs on digits")

# %% [markdown]
# ## The loss surface on the plane through a, b and the curve's bend (Garipov et al. Fig. 1)
#
# The plane is spanned by the two endpoints and the midpoint φ(½) of the trained Bézier curve.
# The colour is log10 of the train loss. The segment from a to b crosses a ridge; the curve goes
# around it through φ(½).

# %%
surface = pl.connectivity.plane(a, b, curve.point(0.5), bundle.train, grid=7 if FAST else 25)
pl.plots.loss_plane(surface, labels=("a", "b", "φ(½)"),
                    title="Train loss on the plane through a, b and φ(½)")

# %% [markdown]
# ## Loss landscapes along random directions (Li et al. 2018)
#
# Around one network: θ + α·δ (+ β·η) with random Gaussian directions scaled filter by filter to
# the norms of the network's own filters (Li et al. 2018, Sec. 4), so networks of different scale
# compare. Model a (dense) next to its pruned, fine-tuned copy: the pruned network's directions
# are zero on its pruned weights, so every point stays as sparse as it is.

# %%
landscape = pl.landscape.compare(a, pruned[0], bundle.test, dims=1, steps=11 if FAST else 41,
                                 span=1.0, seed=0, names=("dense", f"pruned {SPARSITY:.0%}"))
pl.plots.loss_landscape(landscape)

# %%
landscape2 = pl.landscape.compare(a, pruned[0], bundle.test, dims=2, n=5 if FAST else 21,
                                  span=1.0, seed=0, names=("dense", f"pruned {SPARSITY:.0%}"))
pl.plots.loss_landscape(landscape2, kind="contour")

# %%
# Static figures: figures/03_*.{pdf,png}
pl.figures.save(pl.figures.instability(rewound, color="network"), "03_instability_vs_k", final=not FAST)
pl.figures.save(pl.figures.loss_plane(surface, labels=("a", "b", "φ(½)")), "03_loss_plane", final=not FAST)
pl.figures.save(pl.figures.interpolation(paths), "03_segment_vs_bezier_loss", final=not FAST)
pl.figures.save(pl.figures.interpolation(paths, y="error"), "03_segment_vs_bezier_error", final=not FAST)
pl.figures.save(pl.figures.interpolation(sparse.assign(path="pruned")), "03_pruned_interpolation",
                final=not FAST)
pl.figures.save(pl.figures.loss_landscape(landscape), "03_landscape_1d", final=not FAST)
pl.figures.save(pl.figures.loss_landscape(landscape2), "03_landscape_2d", final=not FAST)
