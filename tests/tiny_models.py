"""Tiny models that carry their own example inputs (test fixtures)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 48)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))

    @staticmethod
    def example():
        return torch.randn(4, 32)


class ResidualCNN(nn.Module):
    """conv -> (conv, conv) + skip -> concat branch -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.left = nn.Conv2d(16, 8, 1)
        self.right = nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = h + self.b(F.relu(self.a(h)))
        l = F.avg_pool2d(self.left(h), 2)
        r = self.right(h)
        h = torch.cat([l, r], dim=1)
        return self.fc(self.pool(h).flatten(1))

    @staticmethod
    def example():
        return torch.randn(2, 3, 16, 16)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 24, 5, padding=2)
        self.c2 = nn.Conv1d(24, 32, 3, stride=2, padding=1, padding_mode="circular")
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean(-1))

    @staticmethod
    def example():
        return torch.randn(3, 4, 40)


class DepthwiseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(8, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.gc = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.pw2 = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        return self.pw2(F.relu(self.gc(F.relu(self.dw(F.relu(self.pw1(x)))))))

    @staticmethod
    def example():
        return torch.randn(2, 8, 10, 10)


class TiedLM(nn.Module):
    """Embedding whose weight is tied to the output Linear; a Linear that is never called."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.body = nn.Linear(32, 32)
        self.out = nn.Linear(32, 50, bias=False)
        self.out.weight = self.emb.weight
        self.unused = nn.Linear(32, 32)

    def forward(self, ids):
        return self.out(torch.tanh(self.body(self.emb(ids))))

    @staticmethod
    def example():
        return torch.randint(0, 50, (2, 7))


class TinyBlock(nn.Module):
    """A pre-norm transformer block called with keyword inputs and an attention mask."""

    def __init__(self, d=32, heads=4, hidden=64):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, hidden_states, attention_mask=None):
        b, t, d = hidden_states.shape
        h = self.norm1(hidden_states)
        split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), attn_mask=mask)
        x = hidden_states + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))

    @staticmethod
    def example():
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[1, 4:] = 0
        return {"hidden_states": torch.randn(2, 6, 32), "attention_mask": mask}


class NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.dw = nn.Conv1d(8, 8, 3, groups=8)

    def forward(self, x):
        return self.dw(self.norm(x.transpose(1, 2)).transpose(1, 2))

    @staticmethod
    def example():
        return torch.randn(2, 8, 5)


TINY = {
    "mlp": MLP,
    "residual_cnn": ResidualCNN,
    "conv1d": Conv1dNet,
    "depthwise": DepthwiseNet,
    "tied_lm": TiedLM,
    "transformer_block": TinyBlock,
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = TINY[name]
    return cls().eval(), cls.example()
