"""Prunable weights (DESIGN "Round 2", issue 14 item 4): nn.MultiheadAttention's projections,
Linear-like third-party layers (HuggingFace's transposed Conv1D), embeddings and norms when asked
(``prunable=``), and the layout every structure-aware method reads (graph.out_dim / in_dim)."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import prunelab as pl
from prunelab import graph as G
from prunelab import masks as M
from prunelab import selection as S
from prunelab import semistructured as NM
from prunelab.config import PruneConfig
from tests.contract_models import assert_unchanged, make, snapshot


class Conv1DLike(nn.Module):
    """HuggingFace's transformers.pytorch_utils.Conv1D: weight stored (nx, nf) = (in, out),
    y = x @ W + b (written out here so the core tests run without transformers)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], self.nf)


class FeaturesLike(nn.Module):
    """A third-party Linear stand-in declaring in_features/out_features, weight (out, in)."""

    def __init__(self, i: int, o: int):
        super().__init__()
        self.in_features, self.out_features = i, o
        self.weight = nn.Parameter(torch.randn(o, i) / i ** 0.5)

    def forward(self, x):
        return x @ self.weight.T


class ConvNet1D(nn.Module):
    """Conv1D-like MLP; its twin with nn.Linear holds the transposed weights."""

    def __init__(self, linear: bool = False):
        super().__init__()
        make_layer = (lambda i, o: nn.Linear(i, o)) if linear else (lambda i, o: Conv1DLike(o, i))
        self.a, self.b, self.c = make_layer(8, 12), make_layer(12, 8), make_layer(8, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.relu(self.a(x)))))


def twins(dtype=torch.float64):
    torch.manual_seed(0)
    conv = ConvNet1D().to(dtype)
    lin = ConvNet1D(linear=True).to(dtype)
    with torch.no_grad():
        for n in ("a", "b", "c"):
            getattr(lin, n).weight.copy_(getattr(conv, n).weight.T)
            getattr(lin, n).bias.copy_(getattr(conv, n).bias)
    x = torch.randn(16, 8, dtype=dtype)
    y = torch.randint(0, 3, (16,))
    return conv, lin, (x, y)


class MHANet(nn.Module):
    def __init__(self, kdim=None, vdim=None):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=vdim,
                                          dropout=0.0)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.kv = None if kdim is None else nn.Linear(8, kdim)

    def forward(self, ids):
        h = self.emb(ids)
        kv = h if self.kv is None else self.kv(h)
        a, _ = self.attn(h, kv, kv, need_weights=False)
        return self.head(self.norm(h + a).mean(1))


# ---------------------------------------------------------------------------- what is prunable
def test_default_names_include_attention_projections_and_linear_like_layers():
    m = nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2), FeaturesLike(8, 5),
                      Conv1DLike(3, 5), nn.LayerNorm(3), nn.Embedding(4, 3), nn.Conv1d(3, 2, 1))
    assert G.prunable_names(m) == ["0.weight", "1.in_proj_weight", "1.out_proj.weight",
                                   "2.weight", "3.weight", "6.weight"]
    assert G.prunable_names(m, {"embedding"}) == ["5.weight"]
    assert G.prunable_names(m, "norm") == ["4.weight"]
    assert G.prunable_names(m, {"attention"}) == ["1.in_proj_weight", "1.out_proj.weight"]
    assert G.prunable_names(m, {"linear", "5.weight"}) == ["0.weight", "2.weight", "3.weight",
                                                           "5.weight"]
    assert G.prunable_names(m, lambda n, mod, t: isinstance(mod, nn.Embedding)) == [
        "5.weight"]  # the callable sees every candidate of every kind
    kinds = {c.name: (c.kind, c.out_dim, c.in_dim) for c in G.candidates(m)}
    assert kinds["3.weight"] == ("linear", 1, 0)        # Conv1D: (in, out)
    assert kinds["5.weight"] == ("embedding", 1, 0)     # one-hot in, embedding_dim out
    assert kinds["4.weight"] == ("norm", 0, None)
    assert G.out_dim(m, "3.weight") == 1 and G.in_dim(m, "3.weight") == 0
    assert G.out_dim(m, "1.in_proj_weight") == 0 and G.in_dim(m, "1.in_proj_weight") == 1


def test_separate_q_k_v_projections_when_kdim_differs():
    m = MHANet(kdim=6, vdim=6)
    assert [n for n in G.prunable_names(m) if n.startswith("attn.")] == [
        "attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight"]


def test_a_layer_with_mismatched_declared_sizes_is_not_linear_like():
    bad = FeaturesLike(3, 5)
    bad.in_features = 4  # declared sizes disagree with the weight: not recognised
    assert G.linear_like(bad) is None and G.prunable_names(nn.Sequential(bad)) == []


def test_bad_prunable_names_what_is_allowed():
    m = MHANet()
    with pytest.raises(ValueError, match=r"unknown kinds or tensors \['embeddings'\].*'norm'"):
        G.prunable_names(m, {"embeddings"})
    with pytest.raises(ValueError, match="head.bias"):
        pl.score(m, "mp", prunable=["head.bias"])
    with pytest.raises(TypeError, match="prunable must"):
        G.check_prunable(3)
    with pytest.raises(TypeError, match="prunable must"):
        PruneConfig("mp", sparsity=0.5, prunable=[1, 2])
    with pytest.raises(ValueError, match="unknown kinds or tensors"):
        pl.prune(m, "mp", sparsity=0.5, prunable={"linear", "nope"})


def test_config_key_has_prunable_only_when_given():
    a = PruneConfig("mp", sparsity=0.5)
    assert "prunable" not in a.to_dict()
    b = PruneConfig("mp", sparsity=0.5, prunable=("norm", "embedding"))
    assert b.to_dict()["prunable"] == "embedding+norm"
    assert b.prunable == frozenset({"norm", "embedding"})


# ------------------------------------------------------------- masks on attention projections
def _mha_twin(model, masks):
    """A plain copy whose masked tensors hold W * mask (no parametrization)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in masks.items():
            G.weight(twin, n).mul_(m.to(G.weight(twin, n).dtype))
    return twin


@pytest.mark.parametrize("kdim", [None, 6])
@pytest.mark.parametrize("mechanism", M.MECHANISMS)
def test_masked_in_proj_weight_equals_masked_weight_in_train_and_eval(kdim, mechanism):
    torch.manual_seed(0)
    m = MHANet(kdim=kdim, vdim=kdim)
    ids = torch.randint(0, 11, (5, 7))
    masks = S.select(pl.score(m, "random", seed=1), 0.6)
    attn = [n for n in masks if n.startswith("attn.") and "out_proj" not in n]
    assert attn and all(not masks[n].all() for n in attn)
    pruned = M.apply(m, masks, mechanism=mechanism)
    assert set(M.current(pruned)) == set(masks)
    twin = _mha_twin(m, masks)
    for mode in ("train", "eval"):
        getattr(pruned, mode)()
        getattr(twin, mode)()
        with torch.no_grad(), torch.profiler.profile() as prof:
            got = pruned(ids)
        torch.testing.assert_close(got, twin(ids), rtol=1e-6, atol=1e-6)
        if mode == "eval" and kdim is None:
            # eval + no_grad + batch_first self-attention: the fused fast path ran
            assert "aten::_native_multi_head_attention" in {e.name for e in prof.events()}
    pruned.train()
    out = pruned(ids).sum()
    out.backward()  # gradients reach the tensor (behind the parametrization), pruned ones 0
    for n in attn:
        mod, t = G.module_of(pruned, n), G.split_name(n)[1]
        held = mod.parametrizations[t].original if mechanism == "parametrize" else getattr(mod, t)
        assert held.grad is not None and held.grad[masks[n]].abs().sum() > 0
        if mechanism == "hooks":
            assert torch.all(held.grad[~masks[n]] == 0)
        assert torch.all(G.weight(pruned, n)[~masks[n]] == 0)


def test_mp_on_in_proj_weight_is_its_magnitude():
    m = MHANet()
    s = pl.score(m, "mp")
    # scores are float32 whatever the model's dtype (criteria.check_scores)
    torch.testing.assert_close(s["attn.in_proj_weight"],
                               m.attn.in_proj_weight.detach().abs().float())


def test_export_and_checkpoints_with_non_weight_tensor_names(tmp_path):
    m = MHANet()
    res = pl.prune(m, "mp", sparsity=0.5)
    assert "attn.in_proj_weight" in res.masks
    # save / load
    M.save(res.masks, tmp_path / "m.safetensors")
    back = M.load(tmp_path / "m.safetensors")
    assert all(torch.equal(back[n], res.masks[n]) for n in res.masks)
    # torch.nn.utils.prune round trip on in_proj_weight
    tp = M.to_torch_prune(res.model)
    assert hasattr(tp.attn, "in_proj_weight_mask")
    got = M.from_torch_prune(tp)
    assert set(got) == set(res.masks) and all(torch.equal(got[n], res.masks[n]) for n in got)
    imported = M.import_torch_prune(tp)
    assert set(M.current(imported)) == set(res.masks)
    # dense state dict: plain keys (the default hooks hold pruned entries at 0; parametrize
    # keeps the unmasked originals); loads into a fresh model
    dense = M.dense_state_dict(res.model)
    assert "attn.in_proj_weight" in dense and torch.equal(
        dense["attn.in_proj_weight"], m.attn.in_proj_weight * res.masks["attn.in_proj_weight"])
    original = M.dense_state_dict(M.apply(m, res.masks, mechanism="parametrize"))
    assert torch.equal(original["attn.in_proj_weight"], m.attn.in_proj_weight)
    fresh = MHANet()
    fresh.load_state_dict(dense)
    removed = M.remove(res.model)
    assert torch.equal(removed.attn.in_proj_weight,
                       m.attn.in_proj_weight * res.masks["attn.in_proj_weight"])


def test_stages_and_lambda_on_attention_projections():
    m = MHANet()
    ids = torch.randint(0, 11, (12, 5))
    y = torch.randint(0, 3, (12,))
    before = snapshot(m)
    res = pl.prune(m, "snip", sparsity=0.7, stages=3, lam=1e-2, batch=(ids, y))
    assert_unchanged(before, m)
    total = sum(v.numel() for v in res.masks.values())
    assert sum(int((~v).sum()) for v in res.masks.values()) == S.n_pruned(0.7, total)
    assert torch.all(G.weight(res.model, "attn.in_proj_weight")[
        ~res.masks["attn.in_proj_weight"]] == 0)


# ------------------------------------------------------------------- embeddings and norms
@pytest.mark.parametrize("kind, names", [({"embedding"}, ["emb.weight"]),
                                         ({"norm"}, ["norm.weight"]),
                                         ({"embedding", "norm", "head.weight"},
                                          ["emb.weight", "norm.weight", "head.weight"])])
def test_prunable_selects_embeddings_and_norms(kind, names):
    m = MHANet()
    ids = torch.randint(0, 11, (12, 5))
    y = torch.randint(0, 3, (12,))
    before = snapshot(m)
    s = pl.score(m, "snip", batch=(ids, y), prunable=kind)
    assert list(s) == names
    res = pl.prune(m, "mp", sparsity=0.5, scope="layerwise", prunable=kind)
    assert_unchanged(before, m)
    assert list(res.masks) == names
    for n in names:
        w = G.weight(m, n)
        assert int((~res.masks[n]).sum()) == S.n_pruned(0.5, w.numel())
        assert torch.all(G.weight(res.model, n)[~res.masks[n]] == 0)
    assert res.config["prunable"] == "+".join(sorted(kind))
    # the masked model computes what the manually masked copy computes
    twin = _mha_twin(m, res.masks)
    res.model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(res.model(ids), twin(ids))
    # the outside-default masks still apply, read back and export
    assert set(M.current(res.model)) == set(names)
    assert set(M.current(M.apply(m, res.masks))) == set(names)
    # the default is back once the call returns
    assert "emb.weight" not in G.prunable_names(m)


def test_graph_criteria_refuse_embeddings_by_name():
    m = MHANet()
    with pytest.raises(ValueError, match=r"criterion 'lap' cannot score \['emb.weight'\] "
                                         r"\(embedding tensors\)"):
        pl.score(m, "lap", prunable={"embedding", "linear"})
    ids = torch.randint(0, 11, (12, 5))
    y = torch.randint(0, 3, (12,))
    with pytest.raises(ValueError, match="obd, qm and obd\\+lap cannot score"):
        pl.score(m, "qm", batch=(ids, y), prunable={"norm"})


def test_prunable_linear_only_leaves_attention_out():
    m = MHANet()
    res = pl.prune(m, "lap", sparsity=0.5, prunable={"linear"})
    assert list(res.masks) == ["head.weight"]


# ------------------------------------------------------- transposed Conv1D: the layout is used
CRITERIA_TWINS = ["mp", "random", "lap", "lfp", "lbp", "snip", "grasp", "taylor-fo", "grad-mag",
                  "lm", "qm", "obd", "obd+lap", "obs", "synflow", "lap-forward", "lap-act",
                  "lap-all"]


@pytest.mark.parametrize("criterion", CRITERIA_TWINS)
def test_conv1d_scores_are_the_transposed_linear_scores(criterion):
    """A Conv1D stores W.T: every criterion must give the transposed scores of the nn.Linear
    twin (same function, same weights), so neighbours, rows and GGN columns follow the layout."""
    conv, lin, batch = twins()
    kw = {"sparsity": 0.5, "scope": "layerwise"} if criterion == "lap-forward" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if criterion == "lap-all":
            # torch.fx traces the Conv1D net, but lap-all linearises nn.Linear/nn.Conv only
            with pytest.raises(ValueError, match="lap-all linearises"):
                pl.score(conv, criterion, batch=batch)
            return
        if kw:
            from prunelab import criteria as C
            sc = C.compute(conv, criterion, batch=batch, **kw).scores
            sl = C.compute(lin, criterion, batch=batch, **kw).scores
        else:
            sc = pl.score(conv, criterion, batch=batch, seed=0)
            sl = pl.score(lin, criterion, batch=batch, seed=0)
    assert list(sc) == list(sl) == ["a.weight", "b.weight", "c.weight"]
    for n in sc:
        assert sc[n].shape == G.weight(conv, n).shape
        if criterion == "random":  # uniform scores: shaped like the tensor, not its layout
            continue
        torch.testing.assert_close(sc[n], sl[n].T, rtol=1e-5, atol=1e-7)


def test_obs_update_and_nm_on_conv1d_follow_the_transposed_layout():
    conv, lin, batch = twins()
    rc = pl.prune(conv, "obs", sparsity=0.5, scope="layerwise", batch=batch)
    rl = pl.prune(lin, "obs", sparsity=0.5, scope="layerwise", batch=batch)
    for n in rc.masks:
        assert torch.equal(rc.masks[n], rl.masks[n].T)
        torch.testing.assert_close(G.weight(rc.model, n), G.weight(rl.model, n).T)
    # N:M along the true input dim: groups of 4 consecutive inputs of each output unit, i.e.
    # along dim 0 of the stored (in, out) tensor
    nc = pl.prune(conv, "mp", scope="2:4", batch=batch)
    nl = pl.prune(lin, "mp", scope="2:4", batch=batch)
    for n in nc.masks:
        assert torch.equal(nc.masks[n], nl.masks[n].T)
        NM.check_nm({n: nc.masks[n]}, 2, 4, in_dims={n: 0})
        NM.check_nm({n: nc.masks[n].T}, 2, 4)
    with pytest.raises(ValueError, match="keeps"):  # the stored rows are not N:M groups
        NM.check_nm({"b.weight": nc.masks["b.weight"]}, 2, 4)


def test_layer_graph_reads_conv1d_sizes_from_its_layout():
    conv, lin, batch = twins()
    gc, gl = G.layer_graph(conv), G.layer_graph(lin)
    for n in gl:
        assert (gc[n].in_size, gc[n].out_size, gc[n].prev, gc[n].next) == (
            gl[n].in_size, gl[n].out_size, gl[n].prev, gl[n].next)


# ------------------------------------------------------------------------ HuggingFace GPT-2
def _gpt2():
    pytest.importorskip("transformers",
                        reason="transformers is not installed (pip install -e .[hf])")
    from transformers.pytorch_utils import Conv1D

    model, batch, _ = make("gpt2")
    return model, batch, Conv1D


def test_gpt2_conv1d_layers_are_prunable_with_their_layout():
    model, batch, Conv1D = _gpt2()
    names = G.prunable_names(model)
    conv = [n for n in names if isinstance(G.module_of(model, n), Conv1D)]
    assert conv == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                    "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]
    assert all(G.in_dim(model, n) == 0 and G.out_dim(model, n) == 1 for n in conv)
    assert "transformer.wte.weight" not in names
    assert G.prunable_names(model, {"embedding"}) == ["transformer.wte.weight",
                                                      "transformer.wpe.weight"]
    assert len(G.prunable_names(model, {"norm"})) == 3


def test_gpt2_nm_runs_along_the_input_dim_and_masked_output_matches():
    model, (x, y), _ = _gpt2()
    before = snapshot(model)
    res = pl.prune(model, "snip", scope="2:4", batch=(x, y))
    assert_unchanged(before, model)
    n = "transformer.h.0.mlp.c_fc.weight"  # (nx=8, nf=32): inputs on dim 0
    NM.check_nm({n: res.masks[n]}, 2, 4, in_dims=G.in_dims(model))
    assert torch.equal(res.masks[n].T.reshape(32, 2, 4).sum(-1), torch.full((32, 2), 2))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for k, m in res.masks.items():
            G.weight(twin, k).mul_(m)
    res.model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(res.model(**x).logits, twin(**x).logits)


def test_gpt2_embeddings_when_asked():
    model, (x, y), _ = _gpt2()
    res = pl.prune(model, "taylor-fo", sparsity=0.3, batch=(x, y), prunable={"embedding"})
    assert list(res.masks) == ["transformer.wte.weight", "transformer.wpe.weight"]
    total = sum(v.numel() for v in res.masks.values())
    assert sum(int((~v).sum()) for v in res.masks.values()) == S.n_pruned(0.3, total)


# Criteria that need layers with inputs and outputs refuse embeddings and norms by name.
NEEDS_LAYERS = {
    **{c: "cannot score" for c in ("lap", "lfp", "lbp", "lap-forward", "lap-backward",
                                   "lap-forward-seq", "lap-backward-seq", "obd", "qm",
                                   "obd+lap")},
    "obs": "never called as modules",
    "lap-act": "torch.fx cannot trace",          # MHANet does not trace (as the contract's mha)
    "lap-all": "lap-all needs a model torch.fx can trace",
    "synflow": "synflow feeds an all-ones input",  # token ids
}


@pytest.mark.parametrize("criterion", pl.criteria.names())
@pytest.mark.parametrize("kind", ["embedding", "norm"])
def test_every_criterion_on_embeddings_and_norms_works_or_says_why(criterion, kind):
    m = MHANet()
    ids = torch.randint(0, 11, (12, 5))
    y = torch.randint(0, 3, (12,))
    before = snapshot(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if criterion in NEEDS_LAYERS:
            with pytest.raises(ValueError, match=NEEDS_LAYERS[criterion]):
                pl.prune(m, criterion, sparsity=0.5, scope="layerwise", batch=(ids, y),
                         prunable={kind})
            assert_unchanged(before, m)
            return
        res = pl.prune(m, criterion, sparsity=0.5, scope="layerwise", batch=(ids, y),
                       prunable={kind})
    assert_unchanged(before, m)
    (name,) = res.masks
    assert G.layout(m, name).kind == kind
    assert int((~res.masks[name]).sum()) == S.n_pruned(0.5, res.masks[name].numel())


def test_obs_fisher_blocks_score_embeddings():
    m = MHANet()
    ids = torch.randint(0, 11, (12, 5))
    y = torch.randint(0, 3, (12,))
    s = pl.score(m, "obs", batch=(ids, y), block="fisher", prunable={"embedding"})
    assert list(s) == ["emb.weight"] and s["emb.weight"].shape == m.emb.weight.shape


def test_reinitialize_redraws_attention_projections_and_keeps_masks():
    m = MHANet()
    pruned = pl.prune(m, "mp", sparsity=0.5).model
    for init in (None, "glorot_normal"):
        fresh = M.reinitialize(pruned, seed=3, init=init)
        w = G.weight(fresh, "attn.in_proj_weight")
        assert not torch.equal(w, G.weight(pruned, "attn.in_proj_weight"))
        masks = M.current(fresh)
        assert set(masks) == set(M.current(pruned))
        assert torch.all(w[~masks["attn.in_proj_weight"]] == 0)
    with pytest.raises(ValueError, match="has no reset_parameters"):
        M.reinitialize(pl.prune(ConvNet1D(), "mp", sparsity=0.5).model)


def test_synflow_conservation_reads_conv1d_units_in_their_layout():
    """The conservation table (Tanaka et al. Thm 1) reads a transposed Conv1D's units on its
    output dim: the same numbers as the nn.Linear twin."""
    from prunelab import collapse

    conv, lin, _ = twins()
    tc = collapse.conservation_table(conv, input_shape=(8,))
    tl = collapse.conservation_table(lin, input_shape=(8,))
    assert list(tc["units"]) == list(tl["units"]) == [12, 8, 0]
    for col in ("score_sum", "unit_max_rel_diff"):
        np.testing.assert_allclose(tc[col], tl[col], rtol=1e-9)
