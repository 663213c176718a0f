"""Write the committed notebooks from their cell sources (clean: no outputs, no execution counts).

The notebooks in notebooks/ are the product; this script is how they are kept thin and
reviewable: edit the cells here, run it, commit both.
"""
from pathlib import Path

import nbformat

NB = Path(__file__).resolve().parent.parent / "notebooks"


def md(src):
    return nbformat.v4.new_markdown_cell(src.strip())


def code(src, tags=()):
    cell = nbformat.v4.new_code_cell(src.strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def write(name, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating gives no diff
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, NB / name)


TOUR = [
    md("""
# prunelab tour: pruning a pretrained MLP

We load the default pretrained model (the LM paper's MLP, 300-100 tanh, trained on the embedded
MNIST-1D data), prune it one-shot at several sparsities without fine-tuning, and plot test accuracy
against the fraction of weights that remain. Everything here is a library call; the notebook only
wires them together.
"""),
    code("""
# Parameters (papermill style): FAST=1 runs in seconds for the test suite.
FAST = 0
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
""", tags=["parameters"]),
    code("""
import prunelab as pl

model, bundle = pl.zoo.load("mlp", "mnist1d", seed=0)
print(model)
pl.train.evaluate(model, bundle.test)
"""),
    md("""
## One-shot pruning at several sparsities

`pl.prune` returns a pruned *copy* (the pretrained model is never modified) with its masks and a
per-stage history. Global magnitude pruning (`mp`, Han et al. 2015) ranks all weights together;
`lap` is lookahead pruning (Park et al. 2020, Eq. 5), which also looks at the neighbouring layers;
`random` is the baseline every comparison should include.
"""),
    code("""
criteria = ["mp", "random"] if FAST else ["mp", "lap", "random"]
sparsities = SPARSITIES[::2] if FAST else SPARSITIES
frame = pl.experiments.accuracy_curve(model, bundle, criteria=criteria, sparsities=sparsities)
frame[["criterion", "sparsity", "density", "accuracy", "loss"]].round(4)
"""),
    code("""
fig = pl.plots.accuracy_vs_density(frame, title="MLP on MNIST-1D, one-shot pruning, no fine-tuning")
fig
"""),
    md("""
Where did the pruning go? Global magnitude pruning removes weights unevenly across layers:
"""),
    code("""
result = pl.prune(model, "mp", sparsity=0.9)
pl.masks.density(result.masks)
"""),
    code("""
# Static copy for papers and slides: figures/00_tour_accuracy_vs_density.{pdf,png}
pl.figures.save(pl.figures.accuracy_vs_density(frame), "00_tour_accuracy_vs_density")
"""),
    md("""
## Next

- `01_loss_modelling.ipynb`: the slider explorer and the LM paper's sweeps (λ, stages π, ΔL vs fine-tuned).
- `make lab` opens JupyterLab on `notebooks/`.
"""),
]

LOSS_MODELLING = [
    md("""
# Revisiting loss modelling: stages π, step-size penalty λ, and what survives fine-tuning

This notebook follows *Revisiting Loss Modelling for Unstructured Pruning* (the LM paper). Criteria
model the loss change of removing a weight: OBD ½·G_kk·θ² (Eq. 3), QM −g·θ + ½·G_kk·θ² (Eq. 5) and
LM g·θ (Eq. 6), with G the exact Gauss-Newton diagonal; MP (|θ|) is the baseline. The models are
local, so the paper prunes in π stages and penalises large steps with λ/2·θ².

1. **The explorer**: sliders for sparsity, λ, π and the criterion on the pretrained MLP.
2. **A sweep** over criteria × π × λ × seeds, each run fine-tuned with the original recipe,
   stored in SQLite (re-running skips finished runs).
3. **The paper's figures**: ΔL vs λ per π (Fig. 1), ΔL and ‖Δθ‖ per stage (Fig. 2), ΔL vs the
   validation-error gap after fine-tuning with Spearman's ρ (Fig. 3), and accuracy vs fraction of
   weights remaining (LAP paper Fig. 3).
"""),
    code("""
import os

# Parameters (papermill style). FAST=1 is the small setting the test suite and Voilà demos use.
FAST = int(os.environ.get("PRUNELAB_FAST", "0"))
SPARSITY = 0.9
WORKERS = 2
""", tags=["parameters"]),
    code("""
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
"""),
    md("""
## 1. The explorer

Move the fraction of weights remaining: for a one-shot criterion the scores are cached, so each
move only thresholds and evaluates. For π > 1 press *Run* (and *Cancel* to stop between stages).
"""),
    code("""
explorer = pl.widgets.PruningExplorer(model, bundle)
explorer
"""),
    md("""
## 2. The sweep

Every run loads the pretrained model of its seed, prunes it to the target sparsity with its
criterion, π and λ (global, exponential schedule, 1,000 training examples for the criteria),
measures ΔL = |L(θ+Δθ) − L(θ)| on that batch and the validation error, fine-tunes with the
original recipe and measures again. MP does not depend on λ or π, so it runs once per seed.
"""),
    code("""
grid = pl.experiments.Sweep(arch="mlp", dataset="mnist1d", seed=SEEDS, criterion=CRITERIA,
                            sparsity=SPARSITY, stages=STAGES, lam=LAMS, schedule="exponential",
                            finetune=FINETUNE, examples=1000)
baseline = pl.experiments.Sweep(arch="mlp", dataset="mnist1d", seed=SEEDS, criterion="mp",
                                sparsity=SPARSITY, finetune=FINETUNE, examples=1000)
frame = pd.concat([baseline.run(store=STORE, workers=WORKERS),
                   grid.run(store=STORE, workers=WORKERS)], ignore_index=True)
print(len(frame), "runs")
frame[["criterion", "seed", "stages", "lam", "delta_loss", "val_error_gap", "val_error_gap_ft"]].head()
"""),
    md("""
### Best λ and π per criterion (LM paper Tables 1–2: mean ± std over seeds)
"""),
    code("""
best_dl = pl.metrics.best_over(frame, over=("lam", "stages"), by=("criterion",), value="delta_loss")
best_ft = pl.metrics.best_over(frame, over=("lam", "stages"), by=("criterion",), value="val_error_gap_ft")
best_dl, best_ft
"""),
    md("""
### Fig. 1: ΔL vs λ, one line per π; MP dashed
"""),
    code("""
pl.plots.delta_loss_vs_lambda(frame)
"""),
    md("""
### Fig. 2: ΔL and ‖Δθ‖ along the stages, linear vs exponential schedule (QM, seed 0)
"""),
    code("""
x, y = bundle.batch("train", n=1000, seed=0)
histories = []
for schedule in ("linear", "exponential"):
    r = pl.prune(model, "qm", sparsity=SPARSITY, stages=TRAJECTORY_STAGES, schedule=schedule,
                 batch=(x, y))
    histories.append(r.history.assign(schedule=schedule, criterion="qm"))
history = pd.concat(histories, ignore_index=True)
pl.plots.stage_trajectories(history, color="schedule")
"""),
    md("""
### Fig. 3: does preserving the loss predict the fine-tuned result?

One point per run; ρ is Spearman's rank correlation with a bootstrap 95 % interval over runs.
"""),
    code("""
rho = pl.metrics.spearman(frame, x="delta_loss", y="val_error_gap_ft")
print(rho)
pl.plots.delta_loss_scatter(frame, x="delta_loss", y="val_error_gap_ft")
"""),
    md("""
### Accuracy vs fraction of weights remaining (one-shot, before fine-tuning; mean ± std over seeds)
"""),
    code("""
curves = []
for seed in SEEDS:
    m, b = pl.zoo.load("mlp", "mnist1d", seed=seed)
    c = pl.experiments.accuracy_curve(m, b, criteria=["mp", "lap", "qm"], seed=seed,
                                      sparsities=[0.5, 0.8, 0.9, 0.95] if FAST else
                                      [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    curves.append(c.assign(seed=seed))
curves = pd.concat(curves, ignore_index=True)
pl.plots.accuracy_vs_density(curves, title="MLP on MNIST-1D, one-shot, no fine-tuning")
"""),
    code("""
# Static figures for papers: figures/01_*.{pdf,png}
pl.figures.save(pl.figures.delta_loss_vs_lambda(frame), "01_fig1_delta_loss_vs_lambda")
pl.figures.save(pl.figures.stage_trajectories(history, hue="schedule"), "01_fig2_stage_trajectories")
pl.figures.save(pl.figures.delta_loss_scatter(frame, x="delta_loss", y="val_error_gap_ft"),
                "01_fig3_delta_loss_vs_finetuned")
pl.figures.save(pl.figures.accuracy_vs_density(curves), "01_accuracy_vs_density")
"""),
]

LAYER_COLLAPSE = [
    md("""
# Layer collapse and *Missing the mark*: pruning at initialisation

Part 1 follows Tanaka et al. 2020 (*Pruning neural networks without any data by iteratively
conserving synaptic flow*). On an **untrained** VGG-11 for CIFAR-shaped inputs (3×32×32; a random
batch stands in for data, no CIFAR files needed) we prune one-shot with SNIP, GraSP, SynFlow and
magnitude (MP) at compression ratios ρ = 10⁰ … 10⁴ (ρ = weights / weights remaining, density 1/ρ).
*Layer collapse* is a mask that empties a whole layer: the network then computes a constant. The
critical compression ρ_cr is the largest ρ without collapse; ρ_max = N/L keeps one weight per layer.

Part 2 repeats the ablations of Frankle et al. 2021 (*Pruning neural networks at initialization:
why are we missing the mark?*): masks found at initialisation are shuffled within each layer,
inverted (keep the lowest scores) or kept while the weights are re-drawn, then trained.
"""),
    code("""
import os

# Parameters (papermill style). FAST=1 is the small setting the test suite uses.
FAST = int(os.environ.get("PRUNELAB_FAST", "0"))
SPARSITY = 0.9  # part 2: fraction of weights pruned at initialisation
""", tags=["parameters"]),
    code("""
import numpy as np
import pandas as pd
import torch
import prunelab as pl

WIDTH = 0.25  # a quarter of the channels: the full-width VGG-11 takes hours on 2 CPU cores
RHOS = 10 ** np.linspace(0, 4, 5 if FAST else 17)
SYNFLOW = {"iterations": 10 if FAST else 100}
SEARCH = {"tol": 0.5, "max_iter": 6} if FAST else {"tol": 0.05, "max_iter": 20}
CRITERIA = ["snip", "grasp", "synflow", "mp"]

model = pl.models.build("vgg11", input_shape=(3, 32, 32), num_classes=10, seed=0, width=WIDTH)
g = torch.Generator().manual_seed(0)
batch = (torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
rho_max = pl.collapse.max_compression(model)
print(f"VGG-11 (width {WIDTH}), untrained; rho_max = N/L = {rho_max:.4g}")
"""),
    md("""
## Density per layer at each compression ratio

One row per (criterion, ρ, layer); `collapsed` marks a layer with no weight left. SynFlow is
iterative (its mask depends on the target), so it is re-run for every ρ.
"""),
    code("""
frames = [pl.collapse.layer_density(model, c, RHOS, batch=batch,
                                    **(SYNFLOW if c == "synflow" else {})) for c in CRITERIA]
density = pd.concat(frames, ignore_index=True)
density.pivot_table(index="compression", columns="criterion", values="collapsed", aggfunc="sum")
"""),
    md("""
### Smallest layer density vs ρ (Tanaka et al. Fig. 1, with density in place of accuracy)

The fraction kept in the most-pruned layer; an × marks a ρ at which some layer is empty.
An untrained network has chance accuracy anyway, so the layer densities are the diagnostic.
"""),
    code("""
pl.plots.collapse_curves(density, title="Untrained VGG-11: smallest layer density vs compression")
"""),
    md("""
## Critical compression ρ_cr of each criterion (bisection on log ρ), against ρ_max

`critical` is the largest probed ρ without collapse and `hi` the smallest probed ρ with one: ρ_cr
lies in between (FAST stops after 6 probes, so the bracket is coarse). The paper's axiom
*Maximal Critical Compression* asks for ρ_cr = ρ_max.
"""),
    code("""
searches = [pl.collapse.critical_compression_search(model, c, batch=batch, **SEARCH,
                                                    **(SYNFLOW if c == "synflow" else {}))
            for c in CRITERIA]
critical = pd.DataFrame(searches)[["criterion", "critical", "hi", "max_compression",
                                   "evaluations", "collapsed_layers"]]
critical["critical / max"] = critical["critical"] / critical["max_compression"]
critical
"""),
    code("""
import plotly.graph_objects as go

fig = go.Figure(go.Bar(x=critical["criterion"], y=critical["critical"],
                       text=[f"{v:.3g}" for v in critical["critical"]]))
fig.add_hline(y=rho_max, line_dash="dash", annotation_text=f"ρ_max = {rho_max:.3g}")
fig.update_yaxes(type="log", title_text="critical compression ρ_cr")
fig.update_layout(title="Critical compression per criterion", template="plotly_white")
fig
"""),
    md("""
## Where the weights go: layers × ρ (Tanaka et al. Fig. 3 data)

Colour is log10 of the fraction kept; red × marks a collapsed layer. Magnitude, GraSP and SNIP
empty the large middle convolutions first; SynFlow, with enough iterations (100 in the paper,
10 with FAST), keeps every layer alive the longest.
"""),
    code("""
pl.plots.layer_density_heatmap(density, criterion="snip")
"""),
    code("""
pl.plots.layer_density_heatmap(density, criterion="synflow")
"""),
    md("""
## Conservation of synaptic saliency (Theorems 1–2) for SynFlow's scores

`sum_rel_dev`: how far each layer's summed score is from the mean over layers (Thm 2, equal for
bias-free homogeneous networks); `unit_max_rel_diff`: per hidden unit, incoming vs outgoing
scores (Thm 1). Biases and BatchNorm shifts break the laws slightly.
"""),
    code("""
pl.collapse.conservation_table(model).round(4)
"""),
    code("""
# Static figures: figures/04_*.{pdf,png}
pl.figures.save(pl.figures.collapse_curves(density), "04_collapse_curves")
for crit in ("snip", "synflow"):
    pl.figures.save(pl.figures.layer_density_heatmap(density, criterion=crit),
                    f"04_layer_density_{crit}")
"""),
    md("""
## Part 2: prune at initialisation, then train

Does a criterion that avoids collapse also give a better network after training? Here an
untrained MLP on scikit-learn's 8×8 digits is pruned one-shot at initialisation by each
criterion, then trained with masks applied. For each compression ρ we report test accuracy, and
an × marks a mask with an empty layer (such a network can only predict a constant).
"""),
    code("""
bundle = pl.data.load("digits")
init = pl.models.build("mlp", bundle, seed=0)
recipe = pl.train.Recipe(epochs=1 if FAST else 30, lr=1e-3, batch_size=64)
trained_rhos = [10, 100, 1000] if FAST else [3, 10, 30, 100, 300, 1000, 3000]
after_training = pd.concat([
    pl.collapse.accuracy_vs_compression(init, bundle, c, trained_rhos, finetune=recipe,
                                        **(SYNFLOW if c == "synflow" else {}))
    for c in ["snip", "grasp", "synflow", "mp", "random"]], ignore_index=True)
pl.plots.collapse_curves(after_training, title="MLP on digits, pruned at init then trained: "
                         "test accuracy vs compression")
"""),
    code("""
pl.figures.save(pl.figures.collapse_curves(after_training), "04_accuracy_vs_compression")
"""),
    md("""
## Part 3: *Missing the mark* ablations

The ablations of Frankle et al. 2021 (*Pruning neural networks at initialization: why are we
missing the mark?*, Figs. 2–4), for all five criteria. Each mask found at initialisation is
changed in one of three ways and then trained with the same recipe:

- **shuffled**: the same number of weights per layer, at random positions;
- **inverted**: keep the weights the criterion ranks lowest;
- **reinitialised**: the same mask, with weights drawn fresh from the architecture's initialiser.

The paper found, on CIFAR and ImageNet, that shuffling and reinitialising cost almost nothing.
Its reading is that these methods choose good per-layer densities, not good individual weights.
See whether this small problem agrees. Differences of a point or two between single seeds are
noise; the full setting uses three seeds.
"""),
    code("""
ablations = pl.at_init.compare(
    bundle, arch="mlp", criteria=("snip", "grasp", "synflow", "mp", "random"),
    sparsities=(SPARSITY,) if FAST else (SPARSITY, 0.98), ablations=pl.at_init.ABLATIONS,
    seeds=(0,) if FAST else (0, 1, 2), recipe=recipe,
    criterion_options={"synflow": SYNFLOW})
dense = ablations[ablations.criterion == "dense"]
runs = ablations[ablations.criterion != "dense"]
print(f"dense: test accuracy {dense.test_accuracy.mean():.3f}")
runs.pivot_table(index=["sparsity", "ablation"], columns="criterion", values="test_accuracy",
                 aggfunc="mean").round(3)
"""),
    code("""
import plotly.express as px

fig = px.bar(runs.groupby(["sparsity", "criterion", "ablation"], as_index=False).test_accuracy.mean(),
             x="criterion", y="test_accuracy", color="ablation", barmode="group",
             facet_col="sparsity", template="plotly_white",
             title="Missing the mark: pruned at initialisation, ablated, trained (test accuracy)")
fig.add_hline(y=dense.test_accuracy.mean(), line_dash="dash", annotation_text="dense")
fig
"""),
    code("""
ax = pl.figures.new_axes(6.0, 3.0)[1]
import seaborn as sns
last = runs[runs.sparsity == runs.sparsity.max()]
sns.barplot(data=last, x="criterion", y="test_accuracy", hue="ablation", ax=ax)
ax.axhline(dense.test_accuracy.mean(), color="black", linestyle="--", linewidth=1)
ax.set_title(f"{last.sparsity.iloc[0]:.0%} sparse at initialisation, then trained")
ax.legend(frameon=False, fontsize="small", loc="lower right")
pl.figures.save(ax, "04_missing_the_mark")
"""),
    md("""
## Part 4: global vs layerwise, magnitude vs gradient (Blalock et al. 2020)

Blalock et al. (*What is the state of neural network pruning?*) compare four simple baselines:
magnitude |θ| and gradient magnitude |θ·g| (the SNIP score), each thresholded globally or per
layer. Here they are applied at initialisation over a range of sparsities and then trained.
"""),
    code("""
blalock = pl.at_init.blalock(bundle, recipe=recipe, seeds=(0,) if FAST else (0, 1),
                             sparsities=(0.5, 0.9) if FAST else (0.5, 0.75, 0.9, 0.95, 0.98))
pruned = blalock[blalock.criterion != "dense"].assign(
    method=lambda f: f.criterion.map({"mp": "magnitude", "snip": "gradient |θ·g|"}) + ", " + f.scope,
    density=lambda f: 1 - f.sparsity, accuracy=lambda f: f.test_accuracy)
pl.plots.accuracy_vs_density(pruned, color="method",
                             title="Blalock et al. baselines at initialisation, after training")
"""),
    md("""
## Part 5: what a pruned network costs to store (Deep Compression)

Han et al. 2016 store a pruned network in three stages: the kept weights with relative
indices (sparse), then shared weights from a k-means codebook per layer (8 bits for convs and 5
for dense layers), then Huffman codes for the weights and the indices. Each stage is reported
as a compression ratio against 32-bit dense storage. The network is the SNIP-pruned MLP
(sparsity `SPARSITY`) after training; it is not modified.
"""),
    code("""
snip_net = pl.masks.apply(init, pl.prune(init, "snip", sparsity=SPARSITY,
                                         batch=bundle.batch("train", n=512, seed=0)).masks)
pl.train.fit(snip_net, bundle.train, recipe=recipe, seed=0, progress=False)
report = pl.compression.storage_report(snip_net)
shared = pl.compression.quantized_copy(snip_net)
print(f"test accuracy: pruned {pl.train.evaluate(snip_net, bundle.test)['accuracy']:.3f}, "
      f"with shared weights {pl.train.evaluate(shared, bundle.test)['accuracy']:.3f}")
report[["layer", "kind", "numel", "nonzero", "sparse_ratio", "quantized_ratio",
        "huffman_ratio"]].round(2)
"""),
]

MODE_CONNECTIVITY = [
    md("""
# Mode connectivity: straight lines, curves, and pruned networks

Two MLPs trained on scikit-learn's 8×8 digits from different random seeds are two minima of the
same loss. Along the **straight segment** between them the loss usually rises: the *barrier*
(max along the path minus the mean of the endpoints; Frankle et al. 2020, *Linear mode
connectivity and the lottery ticket hypothesis*) measures by how much. Garipov et al. 2018
(*Loss surfaces, mode connectivity, and fast ensembling of DNNs*) train a **Bézier curve**
φ_θ(t) = (1−t)² a + 2t(1−t) θ + t² b, with only the bend θ learned, along which the loss stays low.
Finally two fine-tuned *pruned* copies sharing a mask are interpolated; the pruned entries stay
exactly zero along the path.
"""),
    code("""
import os

# Parameters (papermill style). FAST=1 is the small setting the test suite uses.
FAST = int(os.environ.get("PRUNELAB_FAST", "0"))
SPARSITY = 0.8
""", tags=["parameters"]),
    code("""
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
"""),
    md("""
## Straight segment vs trained Bézier curve (Garipov et al. Fig. 2; Frankle et al. Fig. 1)

Loss along t ∈ [0, 1] on the train and test splits; the legend gives each path's barrier.
"""),
    code("""
segment = pl.connectivity.interpolate(a, b, bundle, steps=STEPS, splits=("train", "test"))
curve = pl.curves.bezier(a, b)
bend_history = pl.curves.fit_bend(curve, bundle.train, steps=BEND_STEPS, lr=1e-2)
bent = pl.curves.curve_frame(curve, bundle, steps=STEPS, splits=("train", "test"))
paths = pd.concat([segment.assign(path="segment"), bent.assign(path="bezier")],
                  ignore_index=True)
pl.plots.interpolation(paths, title="Loss between two MLPs trained from different seeds")
"""),
    code("""
pl.plots.interpolation(paths, y="error", title="Error along the paths")
"""),
    code("""
barriers = pd.DataFrame([
    {"path": p, "split": s, "loss barrier": pl.connectivity.barrier(f, split=s),
     "error barrier": pl.connectivity.barrier(f, metric="error", split=s)}
    for p, f in (("segment", segment), ("bezier", bent)) for s in ("train", "test")])
barriers.round(4)
"""),
    md("""
## Ensembles (Garipov et al. Sec. 5)

The two endpoints averaged (softmax mean) usually beat each alone; so can an endpoint with the
curve's midpoint φ(½).
"""),
    code("""
test = bundle.test
pd.Series({
    "a alone": pl.train.evaluate(a, test)["error"],
    "b alone": pl.train.evaluate(b, test)["error"],
    "ensemble a + b": pl.curves.ensemble_error(a, b, test),
    "ensemble a + φ(½)": pl.curves.ensemble_error(a, curve.point(0.5), test),
}, name="test error").round(4)
"""),
    md("""
## Explore the curve

Move t to evaluate the Bézier point φ(t) and the straight-line point on the test split.
"""),
    code("""
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
"""),
    md("""
## Pruned networks (Frankle et al. 2020, Sec. 4: instability of sparse networks)

Model a is pruned with global magnitude pruning, then two copies with the same mask are
fine-tuned with different data orders. Both endpoints share the mask, so every interpolated
network is as sparse as they are.
"""),
    code("""
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
"""),
    md("""
## Instability vs the step k the copies split at (Frankle et al. 2020, Figs. 2–3)

One network is trained for k steps. Two copies are then trained to the end with different data
orders, and the straight segment between the two results is evaluated. The *instability* is
that segment's test-error barrier. For ResNets and VGGs on CIFAR-10 and ImageNet, Frankle et
al. find it large at k = 0 and close to zero once k passes a point early in training. From that
point on, SGD noise no longer separates the two copies into different basins. LeNet on MNIST was
stable from k = 0, and this small MLP on digits is too (a barrier of at most one or two test
images at every k in the full run). Use k to pick the splitting step and t to move along the
segment.
"""),
    code("""
init = pl.models.build("mlp", bundle, seed=0)
total = recipe.total_steps(len(bundle.train))
ks = sorted({0, total // 80, total // 40, total // 20, total // 10, total // 4, total // 2})
barriers_k, paths_k = pl.lottery.instability_curve(init, bundle, ks=ks, recipe=recipe,
                                                        steps=STEPS)
pl.plots.instability(barriers_k, title=f"Instability of an MLP on digits ({total} steps in all)")
"""),
    code("""
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
"""),
    md("""
## Sparse subnetworks rewound to k (Frankle et al. 2020, Sec. 4, Figs. 5–6)

The same question for pruned networks. Iterative magnitude pruning (IMP) finds a mask m on the
trained network θ_T, *rewinds* the kept weights to their values θ_k at step k, and trains
m ⊙ θ_k again. Frankle et al. find that at high sparsity a subnetwork rewound to k = 0 is
unstable and misses the dense accuracy, while one rewound to a k early in training is stable and
*matching*. Here m is one round of global magnitude pruning of θ_T; the two copies of m ⊙ θ_k
are trained with m held, and the segment between them keeps m. The table gives each curve's
barrier and the mean test error of its two copies. In the full run this MLP's subnetworks are as
stable as the dense network at every k (barriers of at most two test images), like LeNet in the
paper. What sparsity costs here is accuracy, not stability: with 10 % of the weights the copies
reach about 3 % test error (dense about 2 %), with 2 % about 11 %.
"""),
    code("""
REWIND_SPARSITIES = (0.9, 0.98)
curves = [barriers_k.assign(network="dense")]
for sp in REWIND_SPARSITIES:
    sparse_k, _ = pl.lottery.instability_curve(init, bundle, ks=ks, recipe=recipe,
                                                    steps=STEPS, sparsity=sp)
    curves.append(sparse_k.assign(network=f"{1 - sp:.0%} of weights, rewound to k"))
rewound = pd.concat(curves, ignore_index=True)
rewound["error"] = (rewound.error_a + rewound.error_b) / 2
rewound.pivot_table(index="network", columns="k", values=["barrier", "error"], sort=False).round(3)
"""),
    code("""
pl.plots.instability(rewound, color="network",
                     title="Instability of dense and rewound sparse MLPs on digits")
"""),
    md("""
## The loss surface on the plane through a, b and the curve's bend (Garipov et al. Fig. 1)

The plane is spanned by the two endpoints and the midpoint φ(½) of the trained Bézier curve.
The colour is log10 of the train loss. The segment from a to b crosses a ridge; the curve goes
around it through φ(½).
"""),
    code("""
surface = pl.connectivity.plane(a, b, curve.point(0.5), bundle.train, grid=7 if FAST else 25)
pl.plots.loss_plane(surface, labels=("a", "b", "φ(½)"),
                    title="Train loss on the plane through a, b and φ(½)")
"""),
    code("""
# Static figures: figures/03_*.{pdf,png}
pl.figures.save(pl.figures.instability(rewound, color="network"), "03_instability_vs_k")
pl.figures.save(pl.figures.loss_plane(surface, labels=("a", "b", "φ(½)")), "03_loss_plane")
pl.figures.save(pl.figures.interpolation(paths), "03_segment_vs_bezier_loss")
pl.figures.save(pl.figures.interpolation(paths, y="error"), "03_segment_vs_bezier_error")
pl.figures.save(pl.figures.interpolation(sparse.assign(path="pruned")), "03_pruned_interpolation")
"""),
]

MEAN_REPLACEMENT = [
    md("""
# Mean replacement: pruning whole units, and what it costs

*Mean Replacement Pruning* (MRP, ICLR 2019 submission) prunes whole units (the neurons of a
dense layer, the channels of a convolution). Removing a unit drops its output from the next
layer. **Mean replacement** (`bp_`, "bias propagation") keeps the unit's average contribution:
the unit's mean output, over a batch and over positions, times its outgoing weights, is added to
the next layer's bias (MRP Eq. 4). MRP Sec. 3.3 shows this is the best constant replacement
for a linear consumer.

Here we train a `small_conv` (MRP App. 6.3) on Fashion-MNIST. Every few hundred steps we pause,
prune a copy with each of the 12 scores of MRP Table 1, and measure the **pruning penalty**
L(pruned) − L(dense) on a fixed sample of training images. We do this for the layer sets of MRP
Table 2: all layers at once, or only the first, middle or last conv, or the first dense layer.
The scores are: `rand`; `norm` (the norm of the unit's weights); `rs` and `abs_rs`, the
first-order Taylor estimate of the loss change when the unit is removed, signed and absolute;
`mrs` and `abs_mrs`, the same estimate for mean replacement. Each also comes with `bp_` (mean
replacement applied after pruning).

At the end, `UnitExplorer` lets you prune the trained network yourself. We also compare the
channel criteria of the LAP paper (App. H) and of the lecture slides (HRank, polarization).
"""),
    code("""
import os

# Parameters (papermill style). FAST=1 is the small setting the test suite uses.
FAST = int(os.environ.get("PRUNELAB_FAST", "0"))
ARCH = "small_conv"
DATASET = "fashion-mnist"
FRACTION = 0.1  # fraction of the units of each chosen layer pruned at every measurement
""", tags=["parameters"]),
    code("""
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
"""),
    md("""
## Penalties during training (MRP Fig. 2)

One experiment: seed 0, all layers pruned at once. A solid line is a score with mean
replacement (`bp_`); the dashed line of the same colour is the score without it. A negative
penalty means the pruned network has a lower loss than the dense one.
"""),
    code("""
one = frame[(frame.seed == SEEDS[0]) & (frame.layer_set == "all") & (frame.fraction == FRACTION)]
pl.plots.penalty_over_training(one, title=f"{ARCH} on {DATASET}: {FRACTION:.0%} of the units of "
                               "every layer pruned")
"""),
    md("""
## With vs without mean replacement (MRP Fig. 3)

Each point is one measurement of one score: its penalty without mean replacement (x) and with
it (y). Points below the line y = x are measurements where mean replacement lowered the
penalty.

Mean replacement always makes the next layer's pre-activations closer to the dense ones: their
average shift becomes exactly zero and their squared error drops (MRP Sec. 3.3; the tests
check this). It does not always lower the *loss*, because there are nonlinearities after that
layer. It helps most where the penalty is large: the signed scores `rs` and `mrs` select units
whose removal changes the loss a lot. The absolute-valued scores select units whose removal
hardly matters, so their penalties are close to zero and the comparison is mostly noise.

In the full run (two seeds, 1,440 pairs) mean replacement lowered the penalty in 60 % of the
pairs; MRP reports almost all of them on CIFAR-10. It helped in 65–71 % of the pairs when the
first conv, the last conv or the first dense layer was pruned, but in only 44 % for the middle
conv. A spot check (seed 0, end of training, 30 % of the middle conv's channels) found the
library's `bp_` loss equal to that of the dense model with the pruned channels replaced by their
mean on the way into the next conv, so this is how the network behaves, not a bookkeeping
error. Replacing them by a mean per position instead of per channel helped `rs` there and was
worse for `rand`, `norm` and `abs_mrs`.
"""),
    code("""
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
"""),
    code("""
pl.plots.penalty_scatter(pairs, title=f"Pruning penalty with vs without mean replacement: "
                         f"{pairs.below.mean():.0%} of {len(pairs)} points below y = x")
"""),
    md("""
## After fine-tuning (MRP Fig. 4)

Each pruned copy is then fine-tuned for a few SGD steps (mini-batches of 64 from the fixed
sample, learning rate 1e-3) and its penalty is measured again. MRP reports that the advantage of
mean replacement shrinks as fine-tuning goes on, but is still visible after 500 steps.
"""),
    code("""
pairs_ft = pl.mrp.bp_pairs(frame, value="penalty_ft")
pl.plots.penalty_scatter(pairs_ft, title=f"After {FINETUNE} fine-tuning steps: "
                         f"{pairs_ft.below.mean():.0%} of points below y = x")
"""),
    md("""
## Performance profiles of the 12 scores (MRP Sec. 4.3, Fig. 5)

For each measurement j (a seed, layer set and training step), the threshold is
t_j = τ·(best penalty) + (1 − τ)·(worst penalty) over the 12 scores. A score's curve p(τ) is
the fraction of measurements where its penalty is strictly below t_j. A higher curve is a
better score: at τ = 0 it counts how often a score beats the worst one, and near τ = 1 how
often it is (almost) the best. The table gives the area under each curve. In the full run
the absolute-valued scores (area ≈ 0.94) beat the signed ones (≈ 0.42), and every `bp_` curve
lies above its plain one, as in MRP Sec. 4.3 and Fig. 5.
"""),
    code("""
profile = pl.mrp.penalty_profile(frame)
area = profile.groupby("method").fraction.mean().sort_values(ascending=False)
signed = {s: area[s] for s in area.index if s.removeprefix("bp_") in ("rs", "mrs")}
absolute = {s: area[s] for s in area.index if s.removeprefix("bp_") in ("abs_rs", "abs_mrs")}
print(f"mean area, absolute-valued scores {sum(absolute.values()) / len(absolute):.3f} vs "
      f"signed {sum(signed.values()) / len(signed):.3f}")
area.rename("area under the profile").round(3).to_frame()
"""),
    code("""
pl.plots.performance_profile(profile, pair_prefix="bp_",
                             title="Performance profiles of the 12 scores (penalty, no fine-tuning)")
"""),
    md("""
## Which units do the scores pick? (MRP Figs. 6b and 7)

This uses the middle convolution (MRP uses the second conv of MEDIUM_CONV), with the fraction
`FRACTION` of its channels pruned at every measurement. The histogram shows the mean
squared activation of the channels each score selected, over all measurements. The second plot
shows how many distinct channels a score has picked so far, as a fraction of the layer: a
consistent score keeps choosing the same few channels, while `rand` eventually touches almost
all of them. MRP's Fig. 7b counts only the second half of training; we do the same.
"""),
    code("""
mid = studies[SEEDS[0]]
acts = mid.activations("midconv", FRACTION)
pl.plots.activation_histogram(acts, scores=["rand", "norm", "abs_rs", "abs_mrs", "rs", "mrs"],
                              title="E[a²] of the channels selected in the middle conv")
"""),
    code("""
since = STEPS // 2
consistency = mid.consistency("midconv", FRACTION, since=since)
pl.plots.selection_consistency(consistency, title=f"Channels ever selected since step {since}")
"""),
    md("""
## Try it: prune the trained network yourself

Pick a layer set, a score and the fraction of units. Each move prunes a copy twice, once with
units removed and once with mean replacement, and shows both penalties on 500 validation
images and the sorted scores of the set's first layer (red = pruned). The channel criteria of
the LAP paper (App. H: `mp-l1/l2` are ℓ1/ℓ2 norms of a channel's weights, `lap-l1/l2` the same
norms of its LAP scores) and HRank (the average rank of a channel's feature maps) are in the
same list. HRank needs conv layers: choose `firstconv`, `midconv` or `lastconv`.
"""),
    code("""
pl.widgets.UnitExplorer(trained, bundle, fraction=FRACTION)
"""),
    md("""
## Channel criteria, one-shot (LAP paper App. H; HRank)

Every conv layer of the trained network is pruned once by each criterion, at several fractions,
with and without mean replacement, and evaluated on the test split without fine-tuning. App. H
of the LAP paper reports errors after retraining; these numbers are before it.
"""),
    code("""
convs = pl.mrp.layer_sets(trained)
conv_layers = [convs["firstconv"][0]] + [n for n in convs["all"] if n.startswith("features")][1:]
channel = pl.structured.compare(
    trained, criteria=["random", "mp-l1", "mp-l2", "lap-l1", "lap-l2", "hrank"],
    fractions=(0.1, 0.3, 0.5) if not FAST else (0.3,), layers=conv_layers,
    batch=bundle.batch("train", n=SAMPLE, seed=0), eval_data=test)
channel.pivot_table(index=["criterion", "mean_replacement"], columns="fraction",
                    values="accuracy").round(3)
"""),
    md("""
## Polarization (Zhuang et al. 2020): train so that pruning is a threshold

The polarization regulariser t‖γ‖₁ − ‖γ − γ̄‖₁ on the BatchNorm scales γ pushes each γ
either to 0 or away from the layer mean. Units with γ ≈ 0 can then be cut with a single
threshold at the gap. We train the BN version of the network with and without the
regulariser and look at the |γ| values.
"""),
    code("""
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
"""),
    code("""
polar = nets["polarized"]
threshold = pl.structured.polarization_threshold(polar)
convs_bn = [n for n in pl.mrp.layer_sets(polar)["all"] if n.startswith("features")]
cut = pl.structured.prune_by_threshold(polar, threshold, layers=convs_bn)
rows = [{"model": "polarized, dense", **pl.train.evaluate(polar, test)},
        {"model": f"polarized, |γ| < {threshold:.3g} pruned", **pl.train.evaluate(cut.model, test)},
        {"model": "plain", **pl.train.evaluate(nets["plain"], test)}]
print({k: f"{len(v)}/{cut.sizes[k]}" for k, v in cut.pruned.items()})
pd.DataFrame(rows).set_index("model")[["accuracy", "loss"]].round(3)
"""),
    code("""
# Static figures: figures/02_*.{pdf,png}
pl.figures.save(pl.figures.penalty_over_training(one), "02_penalty_over_training")
pl.figures.save(pl.figures.penalty_scatter(pairs), "02_bp_scatter")
pl.figures.save(pl.figures.penalty_scatter(pairs_ft), "02_bp_scatter_finetuned")
pl.figures.save(pl.figures.performance_profile(profile, pair_prefix="bp_"), "02_performance_profile")
pl.figures.save(pl.figures.activation_histogram(acts, scores=["rand", "abs_mrs", "mrs"]),
                "02_selected_activations")
pl.figures.save(pl.figures.selection_consistency(consistency), "02_selection_consistency")
"""),
]

if __name__ == "__main__":
    write("00_tour.ipynb", TOUR)
    write("01_loss_modelling.ipynb", LOSS_MODELLING)
    write("02_mean_replacement.ipynb", MEAN_REPLACEMENT)
    write("03_mode_connectivity.ipynb", MODE_CONNECTIVITY)
    write("04_layer_collapse.ipynb", LAYER_COLLAPSE)
    print("wrote", sorted(p.name for p in NB.glob("*.ipynb")))
