"""Small models for tests/test_surgery.py and benchmarks/bench_surgery.py."""
import math

import torch
from torch import nn


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.Tanh(),
                         nn.Linear(10, 3))


class ConvBNFlat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.view(x.size(0), -1))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class ResNetish(nn.Module):
    def __init__(self, c=8, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.block1 = Block(c)
        self.block2 = Block(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.head(x.mean((2, 3)))


class Concat(nn.Module):
    """Inception / DenseNet-style: two branches concatenated, then the input appended."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.a = nn.Conv2d(6, 4, 1)
        self.b = nn.Conv2d(6, 5, 3, padding=1)
        self.bn_cat = nn.BatchNorm2d(15)
        self.mix = nn.Conv2d(15, 7, 1)
        self.fc = nn.Linear(7, 3)

    def forward(self, x):
        s = torch.relu(self.bn(self.stem(x)))
        y = torch.cat([self.a(s), self.b(s), s], 1)   # dense connection: s appended
        y = self.mix(torch.relu(self.bn_cat(y)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.pw1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc(self.pw2(x).mean((2, 3)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.c2 = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.g(torch.relu(self.c1(x))))).mean((2, 3))


class EncoderClassifier(nn.Module):
    def __init__(self, d=16, heads=4, ff=24, layers=2, classes=3):
        super().__init__()
        self.embed = nn.Linear(5, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class HFSelfAttention(nn.Module):
    """Mimics transformers' BertSelfAttention (eager): separate query/key/value Linears."""

    def __init__(self, d, heads):
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = d // heads
        self.all_head_size = heads * self.attention_head_size
        self.query = nn.Linear(d, self.all_head_size)
        self.key = nn.Linear(d, self.all_head_size)
        self.value = nn.Linear(d, self.all_head_size)

    def split(self, x):
        return x.view(*x.shape[:-1], self.num_attention_heads,
                      self.attention_head_size).permute(0, 2, 1, 3)

    def forward(self, hidden, attention_mask=None):
        q, k, v = (self.split(f(hidden)) for f in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            scores = scores + attention_mask
        ctx = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        return (ctx.view(*ctx.shape[:-2], self.all_head_size),)


class HFSelfOutput(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.LayerNorm = nn.LayerNorm(d)

    def forward(self, h, x):
        return self.LayerNorm(self.dense(h) + x)


class HFAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.self = HFSelfAttention(d, heads)
        self.output = HFSelfOutput(d)

    def forward(self, x, attention_mask=None):
        return self.output(self.self(x, attention_mask)[0], x)


class HFLayer(nn.Module):
    def __init__(self, d=16, heads=4, ff=20, classes=3):
        super().__init__()
        self.embeddings = nn.Embedding(11, d)
        self.attention = HFAttention(d, heads)
        self.intermediate = nn.Linear(d, ff)
        self.out = nn.Linear(ff, d)
        self.norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask=None):
        x = self.embeddings(input_ids)
        if attention_mask is not None:
            attention_mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        h = self.attention(x, attention_mask)
        h = self.norm(self.out(nn.functional.gelu(self.intermediate(h))) + h)
        return {"logits": self.classifier(h[:, 0])}


def init(model, seed=0):
    """Random BatchNorm statistics, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model.eval()


class SDPAttention(HFSelfAttention):
    """The same attention through F.scaled_dot_product_attention (HF's default "sdpa" path)."""

    def forward(self, hidden, attention_mask=None):
        q, k, v = (self.split(f(hidden)) for f in (self.query, self.key, self.value))
        ctx = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        ctx = ctx.permute(0, 2, 1, 3).contiguous()
        return (ctx.reshape(*ctx.shape[:-2], self.all_head_size),)


def hf_layer_sdpa(**kw):
    model = HFLayer(**kw)
    old = model.attention.self
    new = SDPAttention(old.query.in_features, old.num_attention_heads)
    new.load_state_dict(old.state_dict())
    model.attention.self = new
    return model
