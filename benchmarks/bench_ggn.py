"""Cost of the GGN diagonal (obd, qm) relative to one forward+backward, on 1,000 examples.

DESIGN.md budget: exact GGN diagonal within 4x one forward+backward, Monte-Carlo (1 sample)
within 2.5x (BackPACK's cost); per-sample gradients through ``torch.func.vmap`` cost 25-50x.
Variants are timed round-robin in one run and summarised by medians (the machine is shared:
a 2-thread job slows down when another process takes a core), with the minimum beside it.

    .venv/bin/python benchmarks/bench_ggn.py [--repeats 21] [--conv] [--no-vmap]
                                             [--threads N] [--clock wall|cpu]

``--clock cpu`` times process CPU time instead of wall time: with ``--threads 1`` it measures the
work done and is much less disturbed by other jobs on a busy machine.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.criteria.ggn import ggn_diagonal, loss_grad_ggn


def mlp() -> nn.Module:
    """LM paper App. B MLP on a 40-feature input (mnist1d): 40-300-100-10, tanh."""
    return nn.Sequential(nn.Linear(40, 300), nn.Tanh(), nn.Linear(300, 100), nn.Tanh(),
                         nn.Linear(100, 10))


def fcn() -> nn.Module:
    """LAP paper FCN: 784-500-500-500-500-10, ReLU."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for _ in range(4):
        layers += [nn.Linear(width, 500), nn.ReLU()]
        width = 500
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def convnet() -> nn.Module:
    """A small conv net on 1x28x28 (for information; not in the budget)."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def vmap_per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    {k: g.square().mean(0) for k, g in per_sample.items()}


def variants(no_vmap: bool) -> dict[str, Callable]:
    out: dict[str, Callable] = {
        "fwd+bwd": forward_backward,
        "ggn exact": lambda m, x, y: ggn_diagonal(m, (x, y)),
        "ggn exact autograd": lambda m, x, y: ggn_diagonal(m, (x, y), method="autograd"),
        "ggn mc-1": lambda m, x, y: ggn_diagonal(m, (x, y), mc_samples=1),
        "ggn mc-1 autograd": lambda m, x, y: ggn_diagonal(m, (x, y), mc_samples=1,
                                                          method="autograd"),
        "qm: loss+grad+ggn exact": lambda m, x, y: loss_grad_ggn(m, (x, y)),
        "qm: loss+grad+ggn mc-1": lambda m, x, y: loss_grad_ggn(m, (x, y), mc_samples=1),
    }
    if not no_vmap:
        out["vmap per-sample grad²"] = vmap_per_sample
    return out


def bench(name: str, model: nn.Module, shape: tuple[int, ...], repeats: int,
          no_vmap: bool, clock: Callable[[], float] = time.perf_counter) -> None:
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(1000, *shape)
    y = torch.randint(0, 10, (1000,))
    fns = variants(no_vmap)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn(model, x, y)
    for _ in range(repeats):
        for k, fn in fns.items():
            if k.startswith("vmap") and len(times[k]) >= 3:
                continue  # slow and only for information
            t = clock()
            fn(model, x, y)
            times[k].append(clock() - t)
    base_med = statistics.median(times["fwd+bwd"])
    base_min = min(times["fwd+bwd"])
    print(f"\n{name}: fwd+bwd on 1000 examples, median {base_med * 1e3:.1f} ms, "
          f"min {base_min * 1e3:.1f} ms ({repeats} rounds, {torch.get_num_threads()} threads)")
    print(f"  {'variant':28s} {'median x':>9s} {'min x':>7s}")
    for k, ts in times.items():
        print(f"  {k:28s} {statistics.median(ts) / base_med:9.2f} {min(ts) / base_min:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--conv", action="store_true", help="also a small conv net")
    parser.add_argument("--no-vmap", action="store_true", help="skip the per-sample vmap variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"clock: {args.clock}")
    bench("MLP 40-300-100-10 tanh", mlp(), (40,), args.repeats, args.no_vmap, clock)
    bench("FCN 784-500x4-10 relu", fcn(), (784,), args.repeats, args.no_vmap, clock)
    if args.conv:
        bench("conv 1x28x28 16-32 relu", convnet(), (1, 28, 28), args.repeats, args.no_vmap, clock)


if __name__ == "__main__":
    main()
