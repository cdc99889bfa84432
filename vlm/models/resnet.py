"""CLIP's modified ResNet image tower (CLIP paper, section 2.4).

A three-convolution stem with average pooling (ResNet-D), anti-aliased strided bottlenecks (average pool, then the
stride-1 convolution), and an attention pooling head in place of global average pooling."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        # Downsampling by average pooling before a stride-1 convolution blurs before it
        # subsamples (anti-aliasing), instead of a strided convolution skipping pixels.
        self.branch = nn.Sequential(
            *conv_bn(in_channels, planes, 1), nn.ReLU(inplace=True),
            *conv_bn(planes, planes, 3), nn.ReLU(inplace=True),
            nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
            *conv_bn(planes, out_channels, 1),
        )
        # Each block starts as (nearly) the identity: the last norm's scale is zero.
        nn.init.zeros_(self.branch[-1].weight)
        if stride > 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                                          *conv_bn(in_channels, out_channels, 1))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


class AttentionPool(nn.Module):
    """Multi-head attention with one query: the mean of the spatial tokens. Keys and values
    are the mean token and the spatial tokens, each with a learned positional embedding."""

    def __init__(self, num_tokens: int, width: int, heads: int, out_dim: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention-pool width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.pos_embed = nn.Parameter(width ** -0.5 * torch.randn(num_tokens + 1, width))
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, out_dim)
        for linear in (self.q, self.k, self.v, self.proj):
            nn.init.normal_(linear.weight, std=width ** -0.5)
            nn.init.zeros_(linear.bias)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: [B, N, C] -> (pooled [B, C] before the output projection, embed [B, out_dim])."""
        x = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.pos_embed
        b, n, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x[:, :1])), heads(self.k(x)), heads(self.v(x)))
        pooled = out.transpose(1, 2).reshape(b, c)
        return pooled, self.proj(pooled)


class ModifiedResNet(nn.Module):
    def __init__(self, *, image_size: int, layers: tuple[int, int, int, int], width: int, heads: int,
                 embed_dim: int, grad_checkpointing: bool = False):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size {image_size} is not a multiple of 32 (the ResNet's total stride)")
        self.image_size = image_size
        self.grad_checkpointing = grad_checkpointing
        half = width // 2
        self.stem = nn.Sequential(
            *conv_bn(3, half, 3, stride=2), nn.ReLU(inplace=True),
            *conv_bn(half, half, 3), nn.ReLU(inplace=True),
            *conv_bn(half, width, 3), nn.ReLU(inplace=True),
            nn.AvgPool2d(2),
        )
        blocks, channels = [], width
        for stage, depth in enumerate(layers):
            planes = width * 2 ** stage
            for i in range(depth):
                blocks.append(Bottleneck(channels, planes, stride=2 if stage > 0 and i == 0 else 1))
                channels = planes * Bottleneck.expansion
        self.blocks = nn.ModuleList(blocks)
        self.pooled_dim = channels
        self.attnpool = AttentionPool((image_size // 32) ** 2, channels, heads, embed_dim)

    def forward(self, images: torch.Tensor, keep_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images: [B, 3, S, S] -> (unnormalised)
          "embed":  [B, E] attention-pool output after its output projection;
          "pooled": [B, C] attention-pool output before that projection (C = 32 * width);
          "tokens": [B, (S/32)**2, C] the final feature map as tokens."""
        if keep_index is not None:
            raise ValueError("the ResNet image tower cannot drop patches (keep_index); use a ViT")
        x = self.stem(images.to(next(self.stem.parameters()).dtype))  # float32 input, maybe bf16 weights
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Batch-norm running statistics are updated again in the recomputation.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        tokens = x.flatten(2).transpose(1, 2)
        pooled, embed = self.attnpool(tokens)
        return {"embed": embed, "pooled": pooled, "tokens": tokens}
