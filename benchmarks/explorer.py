"""Timing harness of the pruning explorer's sparsity slider (DESIGN.md's slider budget).

    from benchmarks.explorer import time_slider_move
    time_slider_move(pl.widgets.PruningExplorer(model, bundle))

``python -m benchmarks --only explorer`` runs it on the digits MLP (needs ipywidgets/plotly).
"""
from __future__ import annotations

import statistics
import time

from prunelab.train import evaluate


def time_slider_move(explorer, repeats: int = 41, values=(0.2, 0.1, 0.05, 0.02), *,
                     clock=time.process_time) -> dict:
    """Median time of one sparsity-slider move of ``explorer`` (a
    :class:`prunelab.widgets.PruningExplorer`) vs one evaluation, timed alternately.

    Each round sets ``density.value`` (everything a move triggers: masks rewritten in place,
    evaluation, readout and figure update), then evaluates the unpruned model on the same
    evaluation batch, then on 1,000 training examples, so all three see the same machine
    load (DESIGN.md: ratios of variants timed round-robin). The default clock is the
    process's CPU time: on a shared machine wall-clock medians swing several-fold with other
    jobs, CPU time does not count the time the process waits for a core (pass
    ``clock=time.perf_counter`` for wall time). Needs the one-shot path.

    Returns:
        ``{"move", "evaluate", "ratio", "examples", "evaluate_1000", "ratio_1000"}``:
        seconds of a move, of evaluating the evaluation batch (``examples`` rows) and of
        evaluating 1,000 examples, and the two ratios (DESIGN.md's budget: a move within
        1.1× of evaluating 1,000 examples).
    """
    if not explorer.one_shot:
        raise ValueError("time_slider_move needs the one-shot path: stages π = 1 and a "
                         f"criterion without an inner target ({explorer.criterion.value!r})")
    start = explorer.density.value
    explorer.refresh()  # scores and ranking cached before timing
    score_batch, eval_batch = explorer.score_batch, explorer.eval_batch
    x, y = score_batch if len(score_batch[1]) >= 1000 else eval_batch
    ref = (x[:1000], y[:1000])
    values = [v for v in values if v != start] or [start * 0.5, start]
    moves, evals, evals_1000 = [], [], []
    for v in (values[i % len(values)] for i in range(repeats)):
        if v == explorer.density.value:
            continue
        t0 = clock()
        explorer.density.value = v
        t1 = clock()
        evaluate(explorer.model, eval_batch)
        t2 = clock()
        evaluate(explorer.model, ref)
        t3 = clock()
        moves.append(t1 - t0)
        evals.append(t2 - t1)
        evals_1000.append(t3 - t2)
    explorer.density.value = start
    move, ev, ev1000 = (statistics.median(t) for t in (moves, evals, evals_1000))
    return {"move": move, "evaluate": ev, "ratio": move / ev,
            "examples": len(eval_batch[1]), "evaluate_1000": ev1000,
            "ratio_1000": move / ev1000}
