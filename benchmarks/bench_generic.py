"""Round 2 budgets (DESIGN.md): the generic output/loss/data path, and a small transformer.

1. The same MLP (LM paper App. B, 40-300-100-10 on MNIST-1D-shaped inputs) called two ways:
   plain (``model(x)`` returns logits, batch ``(x, y)``) and generic (a wrapper returns a
   HuggingFace-like object with ``.logits`` and takes a mapping ``{"x": x}``, so
   ``model(**x)``). Ratios generic / plain of ``pl.score(.., "qm")``, ``pl.train.evaluate``
   and ``pl.prune(.., "lm", stages=14)``; budget 1.02.
2. A small ViT-style classifier over MNIST-1D's 40 positions (8 patches of 5, two pre-norm
   encoder blocks with ``nn.Linear`` q/k/v/out projections): the DESIGN budgets LAP / MP
   (1.05), exact GGN obd / fwd+bwd (3.0), Monte-Carlo GGN (1.5) and a slider move /
   evaluation (1.1), wall clock.

Registered in ``benchmarks/__main__.py`` as ``generic`` and ``transformer``; run with
``python -m benchmarks --only generic transformer``.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import prunelab as pl
from benchmarks.common import evaluate_once, fwd_bwd
from prunelab import graph as G
from prunelab import masks as M


@dataclass
class Output:
    """What a HuggingFace classifier returns: an object with ``logits`` (and a loss slot)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class HFLike(nn.Module):
    """Wraps a tensor -> logits model as a keyword-called model returning :class:`Output`."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> Output:
        return Output(logits=self.inner(x))


class Block(nn.Module):
    """Pre-norm encoder block; attention through explicit q/k/v/out ``nn.Linear`` layers."""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.heads, self.d, self.scale = heads, d, 1.0 / math.sqrt(d // heads)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Shapes read inside the graph (no Python unpacking), so torch.fx traces the block.
        n, s = t.shape[0], t.shape[1]
        h = self.norm1(t)

        def split(z):
            return z.reshape(n, s, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        t = t + self.out((att @ v).transpose(1, 2).reshape(n, s, self.d))
        return t + self.fc2(F.gelu(self.fc1(self.norm2(t))))


class TinyViT(nn.Module):
    """ViT-style classifier over a 1-D signal: patches -> tokens -> 2 blocks -> mean -> head."""

    def __init__(self, length: int = 40, patch: int = 5, d: int = 64, heads: int = 4,
                 depth: int = 2, hidden: int = 128, num_classes: int = 10, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch = patch
        self.embed = nn.Linear(patch, d)
        self.pos = nn.Parameter(0.02 * torch.randn(length // patch, d))
        self.blocks = nn.Sequential(*(Block(d, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.reshape(x.shape[0], -1, self.patch)) + self.pos
        return self.head(self.norm(self.blocks(t)).mean(1))


def _data(n: int = 1000, features: int = 40, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def bench_generic(args, round_robin, row) -> list[dict]:
    """Generic (object output, mapping input) / plain (tensor in, tensor out) on the MLP.

    Timed in process CPU time with one torch thread: the generic path's overhead is a few
    percent of a few milliseconds, below the wall-clock noise of this shared machine (another job
    taking a core slows a run 5-15x), while CPU time counts the work done.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench_generic(args, functools.partial(round_robin, clock=time.process_time), row)
    finally:
        torch.set_num_threads(threads)


def _bench_generic(args, round_robin, row) -> list[dict]:
    plain = pl.models.build("mlp", input_shape=(40,), num_classes=10, seed=0).eval()
    generic = HFLike(plain).eval()  # the same weights, called the other way
    x, y = _data()
    xm = {"x": x}
    stages = 14
    reps = args.repeats * 3
    rows = []
    t = round_robin({"plain": lambda: pl.score(plain, "qm", batch=(x, y)),
                     "generic": lambda: pl.score(generic, "qm", batch=(xm, y))}, reps)
    rows.append(row("generic / plain: score qm", "mlp", t["generic"], t["plain"], 1.02))
    t = round_robin({"plain": lambda: pl.train.evaluate(plain, (x, y)),
                     "generic": lambda: pl.train.evaluate(generic, (xm, y))}, reps)
    rows.append(row("generic / plain: evaluate", "mlp", t["generic"], t["plain"], 1.02))
    t = round_robin({"plain": lambda: pl.prune(plain, "lm", sparsity=0.9, stages=stages,
                                               batch=(x, y)),
                     "generic": lambda: pl.prune(generic, "lm", sparsity=0.9, stages=stages,
                                                 batch=(xm, y))}, max(3, args.repeats))
    rows.append(row(f"generic / plain: prune lm {stages} stages", "mlp", t["generic"],
                    t["plain"], 1.02))
    return rows


def bench_transformer(args, round_robin, row) -> list[dict]:
    """DESIGN budgets on the small transformer: LAP/MP, exact GGN/fwd+bwd, slider/eval."""
    model = TinyViT().eval()
    x, y = _data()
    rows = []
    t = round_robin({"mp": lambda: pl.score(model, "mp"),
                     "lap": lambda: pl.score(model, "lap")}, args.repeats * 2)
    rows.append(row("one-shot LAP / MP", "vit", t["lap"], t["mp"], 1.05))
    t = round_robin({"fb": lambda: fwd_bwd(model, x, y),
                     "obd": lambda: pl.score(model, "obd", batch=(x, y)),
                     "qm": lambda: pl.score(model, "qm", batch=(x, y)),
                     "mc": lambda: pl.score(model, "obd", batch=(x, y), mc_samples=1)},
                    args.repeats)
    rows.append(row("obd (exact GGN) / fwd+bwd", "vit", t["obd"], t["fb"], 3.0))
    rows.append(row("qm (exact GGN) / fwd+bwd", "vit", t["qm"], t["fb"], 3.0))
    rows.append(row("obd (MC-1 GGN) / fwd+bwd", "vit", t["mc"], t["fb"], 1.5))

    scores = pl.score(model, "mp")
    ranking = M.Ranking(scores)
    # a move writes the masks into the parametrizations' bool buffers in place
    pruned = M.apply(model, ranking.masks(0.5), mechanism="parametrize")
    buffers = {n: G.module_of(pruned, n).parametrizations[G.split_name(n)[1]][0].mask
               for n in scores}
    sparsities = iter([0.5, 0.9] * 100_000)

    def slider_move():
        ranking.masks(next(sparsities), out=buffers)
        evaluate_once(pruned, x, y)

    t = round_robin({"eval": lambda: evaluate_once(model, x, y), "slider": slider_move},
                    args.repeats * 4)
    rows.append(row("slider move / evaluation", "vit", t["slider"], t["eval"], 1.1))
    return rows
