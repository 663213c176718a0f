"""Structural removal (prunelab.surgery, issue 16 item 1): real speed and the cost of the groups.

Two comparisons, each timed round-robin in one run (``benchmarks/__main__.round_robin``):

* forward time dense / pruned at 50 % of the channels of every removable layer (lowest L1 norm
  first, groups expanded), next to the ratio of their multiply-accumulates: the goal is a measured
  speed-up of at least 0.8 x the FLOP ratio on the CPU. Timed twice, on the same batch, both
  models in eval mode, warm and under no_grad: in PyTorch's default NCHW layout, and with both
  models and the batch in channels-last. In NCHW oneDNN reorders each convolution's input and
  output to its blocked layout; those copies, like ReLU and max-pool, are memory-bound and shrink
  with the channel count (2x at 50 %) while the convolutions' FLOPs shrink ~4x, so NCHW stays
  under the FLOP ratio (1 thread, CPU time, batch 64, conv6: dense 253 ms = convs 218 + ReLU/pool
  37; pruned 85 ms = 66 + 19; ratio 3.0-3.8 of 3.95). Channels-last, the layout a CPU user runs
  conv nets in for speed, has no reorders (ratio 3.9-4.1 on 1 thread; surgery keeps a
  channels-last model's layout). With 2 threads on a loaded machine the ratio drops to 1.5-2.3
  in both layouts: the smaller model's shorter kernels pay the same thread hand-offs;
* time to compute the dependency groups (:func:`prunelab.surgery.dependencies`) against
  Torch-Pruning's ``DependencyGraph().build_dependency`` on the same model and example: the goal is
  a ratio ours / theirs of at most 1 (skipped with a message when torch_pruning is missing). Ours
  runs the forward pass on meta tensors (shapes only), Torch-Pruning's a real one with autograd.

    python -m benchmarks --only surgery [--quick]
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import prunelab as pl
from prunelab import surgery as S


def macs(model: nn.Module, x) -> int:
    """Multiply-accumulates of the Linear and Conv layers in one forward pass of ``x``."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        if isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
        else:
            total += out.numel() * (m.in_channels // m.groups) * m.weight[0, 0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    try:
        with torch.no_grad():
            S.call(model, x)
    finally:
        for h in handles:
            h.remove()
    return total


def half_channels(model: nn.Module, x) -> dict[str, list[int]]:
    """The lower-L1 half of the outputs of every removable layer whose group is not blocked."""
    dg = S.dependencies(model, x)
    sel = {}
    for name, n in dg.producers.items():
        if dg.prods[name].kind == "heads" or dg.group_of(name, 0).blocked:
            continue
        w = model.get_submodule(name).weight.detach()
        norms = w.abs().reshape(n, -1).sum(1)
        sel[name] = torch.argsort(norms, stable=True)[: n // 2].tolist()
    return sel


def run(args, *, round_robin, row) -> list[dict]:
    rows = []
    arch = "conv6"
    model = pl.models.build(arch, input_shape=(3, 32, 32), num_classes=10, seed=0).eval()
    x = torch.randn(16 if args.quick else 64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small = S.remove(model, half_channels(model, x[:2]), x[:2], expand=True).model.eval()
    flop_ratio = macs(model, x[:1]) / macs(small, x[:1])

    def fwd(m, x):
        with torch.no_grad():
            m(x)

    # both models in eval mode, warm (round_robin's warm-up), no_grad, the same batch; once in
    # PyTorch's default NCHW layout and once with both in channels-last (see the docstring)
    cl = torch.channels_last
    layouts = {"": (model, small, x),
               ", channels_last": (copy.deepcopy(model).to(memory_format=cl),
                                   copy.deepcopy(small).to(memory_format=cl),
                                   x.to(memory_format=cl))}
    for label, (dense, pruned, xx) in layouts.items():
        t = round_robin({"dense": lambda: fwd(dense, xx), "pruned": lambda: fwd(pruned, xx)},
                        args.repeats)
        rows.append(row(f"forward dense / pruned, 50% channels{label} (FLOP ratio "
                        f"{flop_ratio:.2f}; budget 0.8x it)", arch, t["dense"], t["pruned"],
                        round(0.8 * flop_ratio, 2), higher_is_better=True))
    try:
        import torch_pruning as tp
    except ImportError:
        print("surgery: torch_pruning is not installed (pip install torch-pruning): the groups "
              "are not timed against DependencyGraph.build_dependency")
        return rows
    for arch in (["conv6"] if args.quick else ["conv6", "resnet18", "vgg19"]):
        model = pl.models.build(arch, input_shape=(3, 32, 32), num_classes=10, seed=0).eval()
        x1 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

        def theirs(model=model, x1=x1):
            with torch.enable_grad():  # Torch-Pruning reads the autograd graph
                tp.DependencyGraph().build_dependency(model, example_inputs=x1)

        t = round_robin({"ours": lambda model=model, x1=x1: S.dependencies(model, x1),
                         "tp": theirs}, args.repeats)
        rows.append(row("dependency groups: ours / Torch-Pruning build_dependency", arch,
                        t["ours"], t["tp"], 1.0))
    return rows
