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

if __name__ == "__main__":
    write("00_tour.ipynb", TOUR)
    print("wrote", NB / "00_tour.ipynb")
