"""tools/gpu_check.py: the no-CUDA path, and its CUDA code path run as a CPU-vs-CPU dry run."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import gpu_check  # noqa: E402


def test_without_cuda_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.strip() == "no CUDA device: nothing to check"
    assert gpu_check.main(["--device", "cuda:1"]) == 0


def test_agreement_counts_identical_entries():
    a = {"w": torch.tensor([True, True, False, False]), "v": torch.ones(2, 3, dtype=torch.bool)}
    b = {"w": torch.tensor([True, False, False, True]), "v": torch.ones(2, 3, dtype=torch.bool)}
    assert gpu_check.agreement(a, a) == 1.0
    assert gpu_check.agreement(a, b) == 8 / 10
    with pytest.raises(ValueError, match="different weights"):
        gpu_check.agreement(a, {"w": a["w"]})


def test_dry_run_of_two_criteria_passes_and_prints_the_table(capsys):
    assert gpu_check.main(["--device", "cpu", "--criteria", "mp", "qm", "--no-tour",
                           "--examples", "64"]) == 0
    out = capsys.readouterr().out
    assert "dry run on cpu" in out and "all checks passed" in out
    for name in ("mp ", "qm ", "qm x14"):
        assert name in out
    assert out.count("identical") >= 3


def test_masks_that_differ_fail_the_check(monkeypatch, capsys):
    def perturbed(model, device):  # a "device" whose weights differ: masks must disagree
        model = gpu_check.copy.deepcopy(model).to(device)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return model

    monkeypatch.setattr(gpu_check, "on", perturbed)
    assert gpu_check.main(["--device", "cpu", "--criteria", "mp", "--no-tour",
                           "--examples", "32"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERENT" in out and "FAILED: mp" in out


@pytest.mark.slow
def test_full_dry_run_every_criterion_and_the_tour(capsys):
    assert gpu_check.main(["--device", "cpu", "--examples", "100"]) == 0
    out = capsys.readouterr().out
    assert "(a) tour mlp/mnist1d" in out and "masks agree 1.000000" in out
    import prunelab as pl

    for name in pl.criteria.names():
        assert f"\n{name} " in out
    assert "CRASH" not in out and "all checks passed" in out
