"""The autograd layer graph (for models torch.fx cannot trace) equals the fx graph wherever both
exist, and sees the true neighbours of attention and residual blocks."""
import pytest
import torch
from torch import nn

from prunelab import batches as B
from prunelab import graph as G
from prunelab import models
from tests.test_graph import ConvBN, Residual, Untraceable, mlp


def fwd(m, x):
    return B.output_tensor(B.call(m, x))


def summary(g):
    """Everything but activation names (fx node names vs autograd node names)."""
    return {n: (set(g[n].prev), set(g[n].next), g[n].bn, g[n].flatten, g[n].external_in,
                g[n].external_out, g[n].act is not None,
                frozenset((e.src, e.dst, e.bns, e.flatten) for e in g[n].inputs))
            for n in g}


CASES = [
    ("mlp", mlp, (5, 12)),
    ("convbn", ConvBN, (2, 3, 16, 16)),
    ("residual", Residual, (2, 2, 6, 6)),
    ("conv6", lambda: models.build("conv6", input_shape=(3, 32, 32), num_classes=10, bn=True,
                                   width=0.25), (2, 3, 32, 32)),
    ("resnet18", lambda: models.build("resnet18", input_shape=(3, 16, 16), num_classes=10,
                                      width=0.125), (2, 3, 16, 16)),
    ("preact", lambda: models.build("preact_resnet18", input_shape=(3, 16, 16), num_classes=10,
                                    width=0.125), (2, 3, 16, 16)),
    ("conv1d", lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(),
                                     nn.MaxPool1d(2), nn.Conv1d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(6 * 5, 3)), (2, 2, 16)),
]


@pytest.mark.parametrize("name, make, shape", CASES, ids=[c[0] for c in CASES])
def test_autograd_graph_equals_the_fx_graph(name, make, shape):
    torch.manual_seed(0)
    m = make()
    x = torch.randn(*shape)
    fx = G._trace_graph(m)
    ag = G._autograd_graph(m, x, fwd, "test")
    assert ag.source == "autograd" and ag.names == fx.names
    assert summary(ag) == summary(fx)


def test_untraceable_model_reads_its_graph_from_a_forward_pass():
    m = Untraceable()
    g = G.layer_graph(m, torch.randn(6, 4))
    assert g.source == "autograd" and not g.traced and "control flow" in g.reason
    assert g["a.weight"].next == ("b.weight",) and g["a.weight"].bn == "bn"
    before = m.bn.running_mean.clone()
    G._autograd_graph(m, torch.randn(6, 4), fwd, "")
    assert torch.equal(m.bn.running_mean, before)  # read in eval mode: no statistics update


class Block(nn.Module):
    """A pre-norm transformer block written with torch ops fx can trace only partly."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids=None, inputs_embeds=None):
        h = inputs_embeds
        n, t, d = h.shape
        if t > 1:  # data-dependent shape logic, as HF code has
            pass
        a = self.ln1(h)
        q = self.q(a).view(n, t, self.heads, -1).transpose(1, 2)
        k = self.k(a).view(n, t, self.heads, -1).transpose(1, 2)
        v = self.v(a).view(n, t, self.heads, -1).transpose(1, 2)
        att = (q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5).softmax(-1)
        h = h + self.o((att @ v).transpose(1, 2).reshape(n, t, d))
        h = h + self.down(torch.nn.functional.gelu(self.up(self.ln2(h))))
        return {"logits": self.head(h.mean(1))}


def test_attention_and_residual_neighbours():
    g = G._autograd_graph(Block(), {"inputs_embeds": torch.randn(2, 5, 8)}, fwd, "")
    # q, k, v feed the attention products: opaque; the output projection reads them
    for p in ("q", "k", "v"):
        assert g[f"{p}.weight"].next == () and g[f"{p}.weight"].external_out
    assert g["o.weight"].prev == () and g["o.weight"].external_in
    # the MLP's true neighbours, through the GELU; the residual stream joins o and down
    assert g["up.weight"].next == ("down.weight",) and g["down.weight"].prev == ("up.weight",)
    assert g["up.weight"].act is not None
    assert set(g["up.weight"].prev) == {"o.weight"}  # through LayerNorm and the residual add
    assert set(g["head.weight"].prev) == {"o.weight", "down.weight"}


def test_transformer_encoder_layer_is_read_without_a_chain_guess():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer)
    g = G.layer_graph(model, torch.randn(3, 4, 8))
    assert g.source in ("fx", "autograd")
    assert g["0.linear2.weight"].prev == ("0.linear1.weight",)
