"""The matrix of models the contract suites run over (issue 14): every criterion and public
entry point either works on each or raises a ValueError/TypeError naming the criterion and the
reason (the documented limitations, README "Your model")."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunelab import graph as G


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        return self.fc(torch.relu(self.b2(self.c2(x))).flatten(1))


class Residual(nn.Module):
    """A user-written residual CNN: conv-BN-ReLU blocks with identity shortcuts."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.a, self.bn_a = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(h))))) + h)
        return self.head(h.mean((2, 3)))


class Encoder(nn.Module):
    """A classifier on nn.TransformerEncoder (fused nn.MultiheadAttention inside)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


class Tokens(nn.Module):
    """Per-token classification (N, T) ids -> (N, T, C) logits in a mapping, ignore_index -100."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.mid(self.emb(input_ids)))
        return {"logits": self.head(h)}


class Attention(nn.Module):
    """A user-written encoder block on nn.MultiheadAttention used directly (fused in_proj_weight),
    a residual MLP and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.up, self.down = nn.Linear(8, 12), nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + a)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h.mean(1))


def _gpt2():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e .[hf])")
    cfg = transformers.GPT2Config(vocab_size=30, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  num_labels=3, pad_token_id=0, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2ForSequenceClassification(cfg)


def _bert():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e .[hf])")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=8, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def make(name: str):
    """(model, batch, kwargs for loss=) of the named case, seeded."""
    torch.manual_seed(0)
    n = 12
    y3 = torch.randint(0, 3, (n,))
    if name == "mlp":
        return (nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(),
                              nn.Linear(5, 3)), (torch.randn(n, 8), y3), {})
    if name == "float64":
        m, b, kw = make("mlp")
        return m.double(), (b[0].double(), b[1]), kw
    if name == "regression":
        return (nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)),
                (torch.randn(n, 3), torch.randn(n, 2)), {"loss": "mse"})
    if name == "convbn":
        return ConvBN(), (torch.randn(n, 3, 8, 8), y3), {}
    if name == "residual":
        return Residual(), (torch.randn(n, 2, 6, 6), y3), {}
    if name == "encoder":
        return Encoder(), (torch.randn(n, 4, 5), y3), {}
    if name == "tokens":
        y = torch.randint(0, 4, (n, 3))
        y[0, 2] = -100
        return Tokens(), ({"input_ids": torch.randint(0, 7, (n, 3))}, y), {}
    if name == "bert":
        x = {"input_ids": torch.randint(0, 30, (n, 5)),
             "attention_mask": torch.ones(n, 5, dtype=torch.long)}
        return _bert(), (x, y3), {}
    if name == "mha":
        return Attention(), (torch.randn(n, 4, 5), y3), {}
    if name == "gpt2":
        x = {"input_ids": torch.randint(1, 30, (n, 5)),
             "attention_mask": torch.ones(n, 5, dtype=torch.long)}
        return _gpt2(), (x, y3), {}
    if name == "vit":
        from prunelab import models

        m = models.build("vit", input_shape=(1, 8, 8), num_classes=3, seed=0)
        return m, (torch.randn(n, 1, 8, 8), y3), {}
    raise KeyError(name)


MODELS = ["mlp", "float64", "regression", "convbn", "residual", "encoder", "tokens", "bert",
          "mha", "gpt2"]

# Documented limitations: (model, criterion) -> a phrase of the error. Everything else works.
LIMITS = {
    **{(m, "lap-act"): "torch.fx cannot trace" for m in ("encoder", "bert", "mha", "gpt2")},
    **{(m, "lap-all"): "lap-all needs a model torch.fx can trace"
       for m in ("encoder", "bert", "mha", "gpt2")},
    ("tokens", "lap-all"): "lap-all pushes the identity basis of one input tensor",
    **{(m, "synflow"): "synflow feeds an all-ones input" for m in ("tokens", "bert", "gpt2")},
    # nn.MultiheadAttention applies in_proj_weight and out_proj functionally: no module calls
    **{(m, c): "cannot score this model" for m in ("encoder", "mha")
       for c in ("obd", "qm", "obd+lap")},
    **{(m, "obs"): "never called as modules" for m in ("encoder", "mha")},
}


def snapshot(model: nn.Module) -> dict:
    """Everything a call must leave as it was: tensors, grads, flags, hooks, parametrizations."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {k: None if p.grad is None else p.grad.clone()
                  for k, p in model.named_parameters()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for k, m in model.named_modules()},
        "parametrized": G.is_parametrized(model),
        "dtype": {k: v.dtype for k, v in model.state_dict().items()},
    }


def assert_unchanged(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert before.keys() == after.keys()
    for key in ("requires_grad", "training", "hooks", "parametrized", "dtype"):
        assert before[key] == after[key], key
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{k} changed"
    for k, g in before["grads"].items():
        h = after["grads"][k]
        assert (g is None and h is None) or (g is not None and h is not None
                                              and torch.equal(g, h)), f"grad of {k} changed"


def mixed_modes(model: nn.Module) -> nn.Module:
    """Train mode overall with every norm layer left in eval by the caller."""
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.Dropout)):
            m.eval()
    return model


__all__ = ["MODELS", "LIMITS", "make", "snapshot", "assert_unchanged", "mixed_modes", "copy"]
