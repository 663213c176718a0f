"""Performance budgets of DESIGN.md, each as a ratio against a baseline timed in the same run.

    python -m benchmarks [--quick] [--only NAME ...] [--repeats N]

Variants of one comparison are timed round-robin (A, B, A, B, ...) and compared by their medians,
because this machine is shared: another process can slow a 2-thread job 5-15x for a while, and
alternating spreads that noise over both sides. Results are printed and appended as tidy rows to
``benchmarks/results/bench-<date>.csv`` so later runs can be compared.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import torch.nn.utils.prune  # noqa: F401  (a submodule: not loaded by `import torch`)
from torch import nn

import prunelab as pl
from benchmarks.common import evaluate_once, fwd_bwd
from prunelab import graph as G
from prunelab import masks as M
from prunelab.explore import MaskedCopy
from prunelab.train import Recipe, make_optimizer

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def round_robin(fns: dict, repeats: int, warmup: int = 1,
                clock=time.perf_counter) -> dict[str, float]:
    """Median seconds of each callable, timed alternately ``repeats`` times after a warm-up
    (``clock=time.process_time`` counts CPU time, steadier on a busy machine)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def data(shape, n=1000, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)




MODELS = {
    "mlp": lambda: pl.models.build("mlp", input_shape=(1, 28, 28), num_classes=10, seed=0),
    "fcn": lambda: pl.models.build("fcn", input_shape=(1, 28, 28), num_classes=10, seed=0),
    "conv6": lambda: pl.models.build("conv6", input_shape=(3, 32, 32), num_classes=10, seed=0),
    "vgg19": lambda: pl.models.build("vgg19", input_shape=(3, 32, 32), num_classes=10, seed=0),
}
SHAPES = {"mlp": (1, 28, 28), "fcn": (1, 28, 28), "conv6": (3, 32, 32), "vgg19": (3, 32, 32)}


def bench_lap_vs_mp(args):
    rows = []
    for arch in (["fcn"] if args.quick else ["fcn", "conv6", "vgg19"]):
        model = MODELS[arch]().eval()
        t = round_robin({"mp": lambda: pl.score(model, "mp"),
                         "lap": lambda: pl.score(model, "lap")}, args.repeats)
        rows.append(row("one-shot LAP / MP", arch, t["lap"], t["mp"], 1.05))
    return rows


def bench_global_mask(args):
    model = MODELS["vgg19"]() if not args.quick else MODELS["fcn"]()
    scores = {n: w.detach().abs() for n, w in G.weights(model).items()}
    params = [(G.module_of(model, n), "weight") for n in scores]
    k = M.n_pruned(0.9, sum(s.numel() for s in scores.values()))

    def torch_global():
        for mod, name in params:
            if hasattr(mod, "weight_mask"):
                torch.nn.utils.prune.remove(mod, name)
        torch.nn.utils.prune.global_unstructured(params, torch.nn.utils.prune.L1Unstructured, amount=k)

    def ours():
        M.select(scores, 0.9, scope="global")

    t = round_robin({"ours": ours, "torch": torch_global}, args.repeats)
    for mod, name in params:
        if hasattr(mod, "weight_mask"):
            torch.nn.utils.prune.remove(mod, name)
    arch = "fcn" if args.quick else "vgg19"
    return [row("torch global_unstructured / ours (higher is better)", arch, t["torch"],
                t["ours"], 20.0, higher_is_better=True)]


def bench_ggn(args):
    rows = []
    for arch in ("mlp", "fcn"):
        model = MODELS[arch]().eval()
        x, y = data(SHAPES[arch])
        fns = {"fb": lambda: fwd_bwd(model, x, y),
               "obd": lambda: pl.score(model, "obd", batch=(x, y)),
               "qm": lambda: pl.score(model, "qm", batch=(x, y)),
               "mc": lambda: pl.score(model, "obd", batch=(x, y), mc_samples=1)}
        peer = _backpack(model, x, y)  # the peer, timed in the same round robin
        fns.update(peer)
        t = round_robin(fns, args.repeats)
        rows.append(row("obd (exact GGN) / fwd+bwd", arch, t["obd"], t["fb"], 3.0))
        rows.append(row("qm (exact GGN) / fwd+bwd", arch, t["qm"], t["fb"], 3.0))
        rows.append(row("obd (MC-1 GGN) / fwd+bwd", arch, t["mc"], t["fb"], 1.5))
        if peer:
            rows.append(row("BackPACK DiagGGNExact / fwd+bwd (peer)", arch, t["bp"], t["fb"],
                            float("inf")))
            rows.append(row("BackPACK DiagGGNMC / fwd+bwd (peer)", arch, t["bp_mc"], t["fb"],
                            float("inf")))
    return rows


def _backpack(model, x, y) -> dict:
    """BackPACK's DiagGGNExact / DiagGGNMC on a copy of ``model`` (its hooks must not slow the
    other variants), or nothing when BackPACK is not installed. Its PyPI package declares
    torchvision, which pulls a CUDA torch here; it runs without it: ``make bench`` installs it
    with ``pip install --no-deps backpack-for-pytorch einops unfoldNd``."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact, DiagGGNMC
    except ImportError:
        print("BackPACK not installed: peer not timed (pip install --no-deps "
              "backpack-for-pytorch einops unfoldNd)")
        return {}
    peer = extend(copy.deepcopy(model))
    lossf = extend(nn.CrossEntropyLoss())

    def run(ext):
        peer.zero_grad()
        loss = lossf(peer(x), y)
        with backpack(ext()):
            loss.backward()
    return {"bp": lambda: run(DiagGGNExact), "bp_mc": lambda: run(DiagGGNMC)}


def bench_slider(args):
    rows = []
    for arch in ("mlp", "fcn"):
        model = MODELS[arch]().eval()
        x, y = data(SHAPES[arch])
        ranking = M.Ranking(pl.score(model, "mp"))
        # What the explorer does (prunelab.explore.MaskedCopy): one plain working copy whose
        # weights and masks are rewritten in place, only where the mask changed. The moves of
        # benchmarks/explorer.py (density 0.2, 0.1, 0.05, 0.02: 3-18 % of the weights change);
        # a jump over more than a third of them takes a full pass (compare + multiply).
        live = MaskedCopy(model)
        sparsities = iter([0.8, 0.9, 0.95, 0.98] * 10_000)

        def slider_move():
            live.show(ranking, next(sparsities))
            evaluate_once(live.model, x, y)

        t = round_robin({"eval": lambda: evaluate_once(model, x, y), "slider": slider_move},
                        args.repeats * 4)
        rows.append(row("slider move / evaluation", arch, t["slider"], t["eval"], 1.1))
    return rows


def bench_explorer(args):
    """The explorer's own slider move (widget traffic included) vs evaluating 1,000 examples."""
    from benchmarks.explorer import time_slider_move

    from torch.utils.data import TensorDataset

    # the MNIST-shaped MLP of the slider bench, on random data (timing only)
    model = MODELS["mlp"]().eval()
    splits = [TensorDataset(*data(SHAPES["mlp"], n=1000, seed=s)) for s in (0, 1, 2)]
    bundle = pl.data.Bundle(name="random", train=splits[0], val=splits[1], test=splits[2],
                            input_shape=SHAPES["mlp"], num_classes=10,
                            classes=[str(c) for c in range(10)])
    explorer = pl.widgets.PruningExplorer(model, bundle, criteria=["mp"], batch_size=1000)
    t = time_slider_move(explorer, repeats=max(5, args.repeats * 3))
    return [row("explorer slider move / evaluating 1,000", "mlp", t["move"], t["evaluate_1000"],
                1.1)]


def bench_stages(args):
    model = MODELS["mlp"]().eval()
    x, y = data(SHAPES["mlp"])
    stages = 14 if args.quick else 140

    def baseline():
        for _ in range(stages):
            fwd_bwd(model, x, y)

    def lm():
        pl.prune(model, "lm", sparsity=0.99, stages=stages, batch=(x, y))

    t = round_robin({"fb": baseline, "lm": lm}, max(3, args.repeats // 2))
    return [row(f"{stages} stages of lm / {stages} fwd+bwd", "mlp", t["lm"], t["fb"], 1.3)]


def bench_masked_step(args):
    rows = []
    for arch in ("mlp", "fcn"):
        dense = MODELS[arch]()
        masked = pl.prune(dense, "mp", sparsity=0.9).model
        x, y = data(SHAPES[arch], n=100)
        recipe = Recipe(optimizer="sgd", lr=1e-3)
        opts = {"dense": make_optimizer(dense, recipe), "masked": make_optimizer(masked, recipe)}

        def step(model, opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        # A step is a few ms and a busy machine slows it in phases: the ratio is the median of
        # ratios of adjacent pairs (each pair sees the same load), over many pairs.
        ratio, t = paired_ratio(lambda: step(masked, opts["masked"]),
                                lambda: step(dense, opts["dense"]), args.repeats * 20)
        rows.append(row("masked / unmasked fine-tuning step", arch, ratio * t["b"], t["b"], 1.05))
    return rows


def paired_ratio(fa, fb, repeats: int, clock=time.process_time) -> tuple[float, dict]:
    """Median over ``repeats`` adjacent pairs of time(fa) / time(fb), the order alternating,
    and the median seconds of each (``{"a": ..., "b": ...}``)."""
    fa(), fb()
    ratios, times = [], {"a": [], "b": []}
    for i in range(repeats):
        pair = {}
        for key, f in (("a", fa), ("b", fb)) if i % 2 == 0 else (("b", fb), ("a", fa)):
            t0 = clock()
            f()
            pair[key] = clock() - t0
            times[key].append(pair[key])
        ratios.append(pair["a"] / pair["b"])
    return statistics.median(ratios), {k: statistics.median(v) for k, v in times.items()}


def bench_import(args):
    import subprocess

    def run(code):
        subprocess.run([sys.executable, "-c", code], check=True)

    t = round_robin({"python": lambda: run("pass"), "prunelab": lambda: run("import prunelab")},
                    max(3, args.repeats // 2))
    return [row("import prunelab (s, absolute)", "-", t["prunelab"] - t["python"], 1.0, 1.5)]


def bench_surgery(args):
    from benchmarks import bench_surgery as surgery

    return surgery.run(args, round_robin=round_robin, row=row)


def bench_generic(args):
    from benchmarks import bench_generic as BG

    return BG.bench_generic(args, round_robin, row)


def bench_transformer(args):
    from benchmarks import bench_generic as BG

    return BG.bench_transformer(args, round_robin, row)


def bench_dask(args):
    from benchmarks import bench_dask as BD

    return BD.bench_dask(args, round_robin, row)


def row(name, arch, value, baseline, budget, higher_is_better=False):
    ratio = value / baseline
    ok = ratio >= budget if higher_is_better else ratio <= budget
    return {"benchmark": name, "arch": arch, "seconds": value, "baseline_seconds": baseline,
            "ratio": ratio, "budget": budget, "within_budget": ok}


BENCHES = {"lap": bench_lap_vs_mp, "mask": bench_global_mask, "ggn": bench_ggn,
           "slider": bench_slider, "explorer": bench_explorer, "stages": bench_stages,
           "masked_step": bench_masked_step, "import": bench_import, "surgery": bench_surgery,
           "generic": bench_generic, "transformer": bench_transformer,
           "dask": bench_dask}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models only (for smoke tests)")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for name, fn in BENCHES.items():
        if args.only and name not in args.only:
            continue
        try:
            new = fn(args)
        except Exception as exc:  # report and go on: one missing piece should not hide the rest
            print(f"{name}: FAILED {type(exc).__name__}: {exc}")
            continue
        for r in new:
            flag = "ok " if r["within_budget"] else "OVER"
            print(f"[{flag}] {r['benchmark']:<52} {r['arch']:>6}  ratio {r['ratio']:7.2f}  "
                  f"(budget {r['budget']}, {r['seconds'] * 1e3:9.2f} ms vs "
                  f"{r['baseline_seconds'] * 1e3:9.2f} ms)")
        rows.extend(new)
    frame = pd.DataFrame(rows)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    frame["run"] = stamp
    frame["torch"] = torch.__version__
    frame["threads"] = torch.get_num_threads()
    frame["machine"] = platform.machine()
    out = args.out or RESULTS / f"bench-{stamp}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
