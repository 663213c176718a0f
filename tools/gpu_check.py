"""Check prunelab on a CUDA device against the CPU (DESIGN.md "Round 2": device and dtype).

    python tools/gpu_check.py                 # on a machine with CUDA: cuda vs cpu
    python tools/gpu_check.py --device cpu    # dry run of the same code, cpu vs cpu
    python tools/gpu_check.py --device cuda:1 --examples 500

Without CUDA (and the default ``--device cuda``) it prints "no CUDA device: nothing to check"
and exits 0. Otherwise, in float32 with TF32 off (so both devices compute in IEEE float32):

a. the tour's core on the zoo MLP / MNIST-1D: score (lap, qm), a staged qm prune with
   ``device=``, evaluate on the test split, ΔL; masks and accuracy compared with the CPU;
b. every criterion of ``pl.criteria.names()`` on the LAP paper's FCN with a fixed random batch:
   a one-shot global prune at sparsity 0.9 on both devices, and the fraction of mask entries
   that agree (data-free criteria should agree exactly; data-dependent ones nearly, since float
   sums on a GPU run in another order and weights near the threshold can swap);
c. one staged qm prune (π = 14 stages) on both devices, masks compared; the option paths that
   draw on a CPU generator or build index tensors (Monte-Carlo GGN ``mc_samples=1``, random
   scores with λ > 0, N:M ``scope="2:4"``); and a masked fine-tuning check: AdamW steps on the
   device leave every pruned weight exactly zero (the default gradient-hook masks);
d. the seconds of every step on both devices, as a table.

Exit status: 1 when a step crashed or a mask agreement is below 0.99; else 0. Scores or masks
left on another device than the model's are reported (a Round 2 contract breach) as a warning.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from pathlib import Path

import torch

try:
    import prunelab as pl
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import prunelab as pl

THRESHOLD = 0.99  # least mask agreement accepted for a data-dependent criterion


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(result, seconds) of ``fn()``, the device's queue drained before the clock stops."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def agreement(a: dict, b: dict) -> float:
    """Fraction of identical entries of two masks (dicts of bool tensors), over all weights."""
    if set(a) != set(b):
        raise ValueError(f"masks hold different weights: {sorted(set(a) ^ set(b))[:4]}")
    same = sum(int((a[n].cpu() == b[n].cpu()).sum()) for n in a)
    total = sum(a[n].numel() for n in a)
    return same / max(total, 1)


def placed(tensors: dict, device: torch.device) -> bool:
    """True when every tensor lives on ``device`` (index-free comparison for "cuda")."""
    return all(t.device.type == device.type and (device.index is None or t.device == device)
               for t in tensors.values())


def on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return copy.deepcopy(model).to(device)


def tour(device: torch.device, cpu: torch.device, examples: int) -> list[dict]:
    """(a): the zoo MLP on MNIST-1D scored, pruned in stages and evaluated on both devices."""
    try:
        model, bundle = pl.zoo.load("mlp", "mnist1d", 0, progress=False)
    except ImportError as exc:  # the mnist1d generator is an optional package
        print(f"(a) tour skipped: {exc}")
        return []
    batch = bundle.batch("train", n=min(examples, len(bundle.train)), seed=0)
    rows, out = [], {}
    for dev in (cpu, device):
        m = model if dev == cpu else on(model, dev)
        lap, t_lap = timed(lambda: pl.score(m, "lap"), dev)
        qm, t_qm = timed(lambda: pl.score(m, "qm", batch=batch), dev)
        # device= moves the caller's (CPU) model for the pruning loop: the Round 2 contract.
        res, t_prune = timed(lambda: pl.prune(model, "qm", sparsity=0.9, stages=3,
                                              batch=batch, device=str(dev)), dev)
        ev, t_eval = timed(lambda: pl.train.evaluate(res.model, bundle.test), dev)
        dl = pl.metrics.delta_loss(m, res.model, batch=batch)
        density = pl.masks.density(res.masks)
        out[dev] = dict(lap=lap, qm=qm, masks=res.masks, acc=ev["accuracy"], dl=dl,
                        kept=int(density["kept"].sum()), on=placed(lap, dev) and placed(qm, dev)
                        and placed(res.masks, dev))
        for step, t in (("tour: lap score", t_lap), ("tour: qm score", t_qm),
                        ("tour: qm prune x3", t_prune), ("tour: evaluate test", t_eval)):
            rows.append({"step": step, "device": str(dev), "seconds": t})
    a, b = out[cpu], out[device]
    agree = agreement(a["masks"], b["masks"])
    print(f"(a) tour mlp/mnist1d: qm 3-stage masks agree {agree:.6f}; test accuracy "
          f"cpu {a['acc']:.4f} vs {device} {b['acc']:.4f}; ΔL cpu {a['dl']:.5f} vs "
          f"{b['dl']:.5f}; kept {a['kept']} vs {b['kept']}; results on {device}: {b['on']}")
    rows.append({"step": "tour: qm prune x3", "agreement": agree, "on_device": b["on"],
                 "check": True})
    return rows


def fcn_batch(examples: int):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(examples, 1, 28, 28, generator=g),
            torch.randint(0, 10, (examples,), generator=g))


def every_criterion(device: torch.device, cpu: torch.device, examples: int,
                    names: list[str]) -> list[dict]:
    """(b): each criterion's one-shot global masks at sparsity 0.9 on the FCN, both devices."""
    model = pl.models.build("fcn", input_shape=(1, 28, 28), num_classes=10, seed=0).eval()
    batch = fcn_batch(examples)
    dev_model = on(model, device)
    pl.prune(dev_model, "mp", sparsity=0.5)  # warm-up: CUDA context and kernels
    rows = []
    for name in names:
        spec = pl.criteria.spec(name)
        # The ordered LAP variants prune layer by layer (Park et al. Sec. 2.3): per-layer targets.
        scope = "layerwise" if spec.module == "lookahead_variants" and spec.uses_target \
            else "global"
        row = {"step": f"criterion {name}", "criterion": name, "check": True,
               "data_free": not spec.needs_data, "scope": scope}
        try:
            a, t_cpu = timed(lambda: pl.prune(model, name, sparsity=0.9, scope=scope,
                                              batch=batch, seed=0).masks, cpu)
            b, t_dev = timed(lambda: pl.prune(dev_model, name, sparsity=0.9, scope=scope,
                                              batch=batch, seed=0).masks, device)
            row.update(agreement=agreement(a, b), on_device=placed(b, device),
                       seconds_cpu=t_cpu, seconds_device=t_dev)
        except Exception:  # report every criterion, then fail
            row["error"] = traceback.format_exc(limit=4).strip().splitlines()[-1]
            print(f"(b) {name}: CRASH\n{traceback.format_exc(limit=6)}")
        rows.append(row)
    return rows


def staged_qm(device: torch.device, cpu: torch.device, examples: int) -> dict:
    """(c): qm with π = 14 exponential stages to sparsity 0.9 on the FCN, both devices."""
    model = pl.models.build("fcn", input_shape=(1, 28, 28), num_classes=10, seed=0).eval()
    batch = fcn_batch(examples)
    a, t_cpu = timed(lambda: pl.prune(model, "qm", sparsity=0.9, stages=14, batch=batch).masks,
                     cpu)
    b, t_dev = timed(lambda: pl.prune(model, "qm", sparsity=0.9, stages=14, batch=batch,
                                      device=str(device)).masks, device)
    return {"step": "qm 14 stages", "criterion": "qm x14", "check": True, "data_free": False,
            "scope": "global",
            "agreement": agreement(a, b), "on_device": placed(b, device),
            "seconds_cpu": t_cpu, "seconds_device": t_dev}


# (label, criterion, pl.prune options): paths the plain criteria of (b) do not take
VARIANTS = [("obd mc-1", "obd", {"mc_samples": 1}), ("random lam", "random", {"lam": 1e-3}),
            ("mp 2:4", "mp", {"scope": "2:4", "sparsity": None}),
            ("lap 2:4", "lap", {"scope": "2:4", "sparsity": None})]


def option_paths(device: torch.device, cpu: torch.device, examples: int) -> list[dict]:
    """(c): :data:`VARIANTS` on both devices, and masked fine-tuning on the device."""
    model = pl.models.build("fcn", input_shape=(1, 28, 28), num_classes=10, seed=0).eval()
    batch = fcn_batch(examples)
    dev_model = on(model, device)
    rows = []
    for label, name, options in VARIANTS:
        options = {"sparsity": 0.9, **options}
        row = {"step": label, "criterion": label, "check": True,
               "data_free": not pl.criteria.spec(name).needs_data and "lam" not in options,
               "scope": options.get("scope", "global")}
        try:
            a, t_cpu = timed(lambda: pl.prune(model, name, batch=batch, seed=0,
                                              **options).masks, cpu)
            b, t_dev = timed(lambda: pl.prune(dev_model, name, batch=batch, seed=0,
                                              **options).masks, device)
            row.update(agreement=agreement(a, b), on_device=placed(b, device),
                       seconds_cpu=t_cpu, seconds_device=t_dev)
        except Exception:
            row["error"] = traceback.format_exc(limit=4).strip().splitlines()[-1]
            print(f"(c) {label}: CRASH\n{traceback.format_exc(limit=6)}")
        rows.append(row)
    row = {"step": "masked AdamW", "criterion": "masked AdamW x5", "check": True,
           "data_free": True, "scope": "global"}
    try:
        def finetune():
            res = pl.prune(dev_model, "mp", sparsity=0.9)
            net = res.model.train()
            opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
            x, y = (t.to(device) for t in batch)
            for _ in range(5):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            # per layer: are all its pruned weights still exactly zero? (0-d bools on device)
            return {n: (pl.graph.weight(net, n).detach()[~m] == 0).all()
                    for n, m in res.masks.items()}
        ok, t_dev = timed(finetune, device)
        row.update(agreement=float(sum(int(m.all()) for m in ok.values()) / len(ok)),
                   on_device=placed(ok, device), seconds_cpu=float("nan"), seconds_device=t_dev)
    except Exception:
        row["error"] = traceback.format_exc(limit=4).strip().splitlines()[-1]
        print(f"(c) masked AdamW: CRASH\n{traceback.format_exc(limit=6)}")
    rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="device to check against the CPU "
                    "(default cuda; 'cpu' for a dry run of the same code)")
    ap.add_argument("--examples", type=int, default=500, help="batch size of the checks")
    ap.add_argument("--criteria", nargs="*", default=None, help="subset of criteria for (b)")
    ap.add_argument("--no-tour", action="store_true", help="skip (a)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    if device.type == "cuda":
        print(f"device {device}: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"dry run on {device}: the checks of a CUDA run, {device} against cpu")
    # IEEE float32 on both sides: TF32 matmuls would differ from the CPU by design, not by bug.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = torch.device("cpu")
    names = args.criteria or pl.criteria.names()
    t0 = time.perf_counter()

    rows, failed = [], []
    if not args.no_tour:
        try:
            rows += tour(device, cpu, args.examples)
        except Exception:
            print(f"(a) tour: CRASH\n{traceback.format_exc(limit=6)}")
            failed.append("tour")
    crit = every_criterion(device, cpu, args.examples, names)
    try:
        crit.append(staged_qm(device, cpu, args.examples))
    except Exception:
        print(f"(c) qm 14 stages: CRASH\n{traceback.format_exc(limit=6)}")
        failed.append("qm 14 stages")
    crit += option_paths(device, cpu, args.examples)

    # (d) the table
    print(f"\n(b, c) masks at sparsity 0.9, {args.examples} examples, FCN 784-500x4-10, "
          f"float32; seconds per pl.prune on each device")
    print(f"{'criterion':<18} {'data':>5} {'scope':>9} {'agree':>10} {'on dev':>7} {'cpu s':>8} "
          f"{str(device) + ' s':>9} {'speed-up':>8}  verdict")
    for r in crit:
        if "error" in r:
            print(f"{r['criterion']:<18} {'-':>5} {'CRASH':>10}  {r['error']}")
            failed.append(r["criterion"])
            continue
        exact = r["agreement"] == 1.0
        ok = r["agreement"] >= THRESHOLD
        verdict = "identical" if exact else ("close" if ok else "DIFFERENT")
        if r["data_free"] and not exact:
            verdict += " (data-free: expected identical)"
        if not r["on_device"]:
            verdict += f" (WARNING: masks not on {device})"
        if not ok:
            failed.append(r["criterion"])
        print(f"{r['criterion']:<18} {'free' if r['data_free'] else 'batch':>5} "
              f"{r['scope']:>9} {r['agreement']:>10.6f} {str(r['on_device']):>7} "
              f"{r['seconds_cpu']:>8.3f} "
              f"{r['seconds_device']:>9.3f} {r['seconds_cpu'] / r['seconds_device']:>8.2f}  "
              f"{verdict}")
    tour_rows = [r for r in rows if "seconds" in r]
    if tour_rows:
        print("\n(a, d) tour steps, seconds")
        for r in tour_rows:
            print(f"  {r['step']:<22} {r['device']:>8} {r['seconds']:>8.3f}")
    for r in rows:
        if r.get("check") and r["agreement"] < THRESHOLD:
            failed.append(r["step"])
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    if failed:
        print(f"FAILED: {', '.join(dict.fromkeys(failed))}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
