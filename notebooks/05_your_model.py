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
# # Your model, your data, your loss
#
# prunelab is not limited to its own architectures and datasets. Anything that is an
# `nn.Module` can be scored, pruned in stages with the step-size penalty λ, fine-tuned and
# explored, as long as it follows one small contract (see `pl.batches`):
#
# * **inputs**: a batch `(x, y)` where `x` is a tensor (`model(x)`), a mapping of tensors
#   (`model(**x)`, e.g. `input_ids` and `attention_mask`) or a tuple (`model(*x)`);
# * **outputs**: a tensor, a tuple (its first element) or anything with `logits` (HuggingFace's
#   `ModelOutput`); `output=` adapts anything else;
# * **loss**: `loss="cross_entropy"` (per class, or per token with `-100` ignored), `"mse"`, or
#   your own callable `(output, target) -> mean loss`;
# * **data**: `(x, y)` tensors, a `Dataset` or a `DataLoader`; `pl.data.from_tensors` turns your
#   tensors into a bundle the explorer and the sweeps take;
# * **device**: everything runs where the model's parameters are.
#
# We take two models prunelab has never seen: a residual CNN written here, trained on the digits
# of scikit-learn, and a BERT classifier built from a configuration (no download) and trained on
# a small synthetic text task.

# %% tags=["parameters"]
# Parameters (papermill style): FAST=1 is the small setting the test suite uses.
FAST = 0

# %%
import functools

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

import prunelab as pl

EPOCHS = 3 if FAST else 30
SEEDS = (0,) if FAST else (0, 1, 2)
LAMS = (0.0, 1e-2) if FAST else (0.0, 1e-3, 1e-2, 1e-1)
STAGES = (1, 4) if FAST else (1, 4, 16)

# %% [markdown]
# ## A residual CNN of your own, on your own tensors
#
# `pl.data.from_tensors` holds out a seeded validation split and gives the same `Bundle` the
# registered datasets give. The model is plain PyTorch: convolutions, BatchNorm, identity
# shortcuts, global average pooling.

# %%
from sklearn.datasets import load_digits

digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
y = torch.tensor(digits.target)
bundle = pl.data.from_tensors((x[:1500], y[:1500]), test=(x[1500:], y[1500:]), name="my-digits")
bundle


# %%
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, h):
        out = torch.relu(self.bn1(self.conv1(h)))
        return torch.relu(self.bn2(self.conv2(out)) + h)


class ResCNN(nn.Module):
    def __init__(self, c=16, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


recipe = pl.train.Recipe(optimizer="adam", lr=3e-3, epochs=EPOCHS, batch_size=64)


@functools.cache  # a sweep asks for the model of a seed once per run: train it once
def pretrained_rescnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = ResCNN()
    pl.train.fit(model, bundle.train, recipe=recipe, val=bundle.val, seed=seed, progress=False)
    return model.eval()


cnn = pretrained_rescnn(0)
pl.train.evaluate(cnn, bundle.test)

# %% [markdown]
# The layer graph comes from `torch.fx` (or, for models it cannot trace, from the autograd graph
# of one forward pass): the lookahead criteria see that the second conv of each block feeds the
# next block *and* the shortcut.

# %%
graph = pl.graph.layer_graph(cnn)
{name: graph[name].next for name in graph}

# %% [markdown]
# Score it with a few criteria, prune it with stages and λ, and fine-tune. The pretrained model
# is never modified: `pl.prune` returns a pruned copy.

# %%
batch = bundle.batch("train", n=512, seed=0)
scores = {c: pl.score(cnn, c, batch=batch) for c in ("mp", "lap", "snip", "qm")}
{c: float(s["stem.weight"].mean()) for c, s in scores.items()}

# %%
result = pl.prune(cnn, "qm", sparsity=0.9, stages=8, lam=1e-2, batch=batch,
                  finetune=recipe.replace(epochs=max(1, EPOCHS // 3)), train_data=bundle.train,
                  val_data=bundle.val)
print(result)
result.history

# %%
pl.train.evaluate(result.model, bundle.test), pl.masks.density(result.masks)

# %% [markdown]
# ## ΔL against the fine-tuned gap, for your model
#
# A sweep takes your models and data by name: `arch={"name": seed -> pretrained model}` and
# `dataset={"name": bundle}`. The names are what the frame and the store keys hold.

# %%
common = dict(arch={"rescnn": pretrained_rescnn}, dataset={"my-digits": bundle}, seed=SEEDS,
              sparsity=0.9, examples=256,
              finetune={"optimizer": "adam", "lr": 1e-3, "epochs": max(1, EPOCHS // 5),
                        "batch_size": 64})
# MP does not depend on λ or π: once per seed. Closures and local classes do not pickle, so the
# runs happen in this process (workers=0).
frame = pd.concat([
    pl.experiments.Sweep(criterion="mp", **common).run(store="05_your_model.sqlite",
                                                       executor="local", workers=0),
    pl.experiments.Sweep(criterion=["lm", "qm"], stages=STAGES, lam=LAMS, **common).run(
        store="05_your_model.sqlite", executor="local", workers=0),
], ignore_index=True)
frame[["criterion", "stages", "lam", "seed", "delta_loss", "val_error_gap_ft"]].head()

# %%
pl.plots.delta_loss_scatter(frame, x="delta_loss", y="val_error_gap_ft")

# %%
pl.figures.save(pl.figures.delta_loss_scatter(frame, x="delta_loss", y="val_error_gap_ft"),
                "05_rescnn_delta_loss_scatter", final=not FAST)

# %% [markdown]
# ## The explorer on your model
#
# Sliders for sparsity, λ and π, and the criterion, on the residual CNN and your bundle.

# %%
pl.widgets.PruningExplorer(cnn, bundle, criteria=["mp", "lap", "snip", "qm"])

# %% [markdown]
# ## A HuggingFace classifier built from a configuration
#
# No hub download: `BertConfig(...)` describes a two-layer BERT and
# `BertForSequenceClassification(config)` builds it with random weights. We train it on a
# synthetic task (is token 7 more frequent than token 9 in the sequence?) fed by a `DataLoader`
# of mappings, as HuggingFace data collators produce them. The model returns a
# `SequenceClassifierOutput`; prunelab reads its `logits`.

# %%
try:
    from transformers import BertConfig, BertForSequenceClassification
except ImportError:  # pip install -e .[hf]
    BertConfig = None
    print("transformers is not installed (pip install -e .[hf]): skipping the BERT part")

# %%
if BertConfig is not None:
    gen = torch.Generator().manual_seed(0)
    n_text = 600 if FAST else 3000
    ids = torch.randint(1, 20, (n_text, 16), generator=gen)
    labels = ((ids == 7).sum(1) > (ids == 9).sum(1)).long()
    items = [{"input_ids": ids[i], "attention_mask": torch.ones(16, dtype=torch.long),
              "labels": labels[i]} for i in range(n_text)]
    loader = DataLoader(items[: int(0.8 * n_text)], batch_size=32, shuffle=True)
    text = pl.data.from_datasets(loader, test=DataLoader(items[int(0.8 * n_text):]),
                                 name="count-7-vs-9")
    config = BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    bert = BertForSequenceClassification(config)
    pl.train.fit(bert, text.train, recipe=pl.train.Recipe(lr=1e-3, epochs=2 if FAST else 15,
                                                          batch_size=32),
                 val=text.val, progress=False)
    bert.eval()
    print(pl.train.evaluate(bert, text.test))

# %% [markdown]
# BERT cannot be traced by `torch.fx`; its layer graph is read from one forward pass instead, so
# LAP sees that each feed-forward block's two Linear layers are neighbours while the attention
# projections meet in the attention products.

# %%
if BertConfig is not None:
    tbatch = text.batch("train", n=256, seed=0)
    g = pl.graph.layer_graph(bert, tbatch[0])
    print(g.source, {n: g[n].next for n in g if "layer.0." in n})
    pruned = pl.prune(bert, "qm", sparsity=0.5, stages=4, lam=1e-3, batch=tbatch,
                      finetune=pl.train.Recipe(lr=5e-4, epochs=1, batch_size=32),
                      train_data=text.train, val_data=text.val)
    print(pruned)
    print("pruned:", pl.train.evaluate(pruned.model, text.test))

# %% [markdown]
# ## What does not work, and says so
#
# A few criteria need something a model may not have: SynFlow feeds an all-ones input in place of
# the data (a BERT takes token ids), LAP-act and LAP-all read the `torch.fx` graph, and the
# GGN criteria (OBD, QM, OBD+LAP) read each layer's inputs from its module calls, which
# `nn.MultiheadAttention`'s fused kernel bypasses. Each raises a `ValueError` naming the criterion
# and the reason (README, "Your model"), instead of a wrong number.

# %%
if BertConfig is not None:
    try:
        pl.score(bert, "synflow", batch=tbatch)
    except ValueError as err:
        print(err)
