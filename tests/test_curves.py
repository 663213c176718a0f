"""Curves with a trainable bend (Bezier / polygonal chain, Garipov et al.): prunelab.curves.

All models are trained here, on the small ``digits`` dataset (no zoo seeds >= 1 needed).
"""

import pytest
import torch

from prunelab import connectivity as C
from prunelab import curves as CV

torch.set_num_threads(1)




# ----------------------------------------------------------------------------- curves
@pytest.mark.parametrize("make", [CV.bezier, CV.polychain])
def test_midpoint_bend_is_the_segment(pair, digits, make):
    a, b = pair
    _, _, te = digits
    cv = make(a, b, bend_init="midpoint")
    x = te[0][:50].to(next(a.parameters()).dtype)
    for t in (0.0, 0.1, 0.37, 0.5, 0.8, 1.0):
        line = C.lerp_model(a, b, t)
        w = cv.weights(t)
        for n, p in line.named_parameters():
            torch.testing.assert_close(w[n], p, rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(cv.point(t)(x), line(x), rtol=0, atol=1e-5)
    f, g = CV.curve_frame(cv, te, steps=5), C.interpolate(a, b, te, steps=5)
    assert f["loss"].iloc[0] == g["loss"].iloc[0] and f["loss"].iloc[-1] == g["loss"].iloc[-1]
    assert f["loss"].to_numpy() == pytest.approx(g["loss"].to_numpy(), abs=1e-5)


def test_trained_bezier_has_lower_barrier_than_segment(digits, pair):
    """Garipov et al. Fig. 2: two independently trained MLPs joined by a trained Bezier curve."""
    _, tr, te = digits
    a, b = pair
    line = C.interpolate(a, b, tr, steps=11)
    cv = CV.bezier(a, b)
    hist = CV.fit_bend(cv, tr, steps=300, lr=1e-2, batch_size=128, seed=0)
    assert len(hist) == 300 and hist["t"].between(0, 1).all()
    curve = CV.curve_frame(cv, tr, steps=11)
    b_line, b_curve = C.barrier(line), C.barrier(curve)
    print(f"digits train-loss barrier: segment {b_line:.4f}, trained Bezier {b_curve:.4f}")
    assert b_line > 0.1
    assert b_curve < 0.5 * b_line
    # endpoints fixed by training the bend only
    assert curve["loss"].iloc[0] == line["loss"].iloc[0]
    assert curve["loss"].iloc[-1] == line["loss"].iloc[-1]
    err = CV.ensemble_error(a, cv.point(0.5), te)
    assert 0.0 <= err <= 0.2
    # plane through a, b and the curve midpoint
    p = C.plane(a, b, cv.point(0.5), te, grid=3, margin=0.0)
    assert list(p.columns) == ["u", "v", "loss", "error"] and len(p) == 9
    pts = p.attrs["points"]
    assert pts["a"] == (0.0, 0.0) and pts["b"][1] == 0.0 and pts["c"][1] > 0
    assert p["loss"].notna().all()
