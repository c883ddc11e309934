"""A plain Vision Transformer whose every weighted matmul is an nn.Linear (qkv, proj, fc1, fc2, head), as in timm's
ViT: so each is a quantizable layer. `vit_like(...)` defaults to ViT-B/32's shape (224x224, patch 32, width 768,
depth 12, 12 heads, MLP 3072: torchvision's vit_b_32 has the same layers, its attention inside
nn.MultiheadAttention); `small_vit` is a tiny one for 28x28 images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VisionTransformer", "small_vit", "vit_like"]


class Attention(nn.Module):
    """Multi-head self-attention: one qkv Linear, scaled dot-product attention, one output Linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """Patch embedding (a strided conv), class token, learned positions, `depth` blocks, LayerNorm, linear head."""

    def __init__(self, image_size: int, patch: int, dim: int, depth: int, heads: int, mlp_dim: int,
                 num_classes: int, in_channels: int):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_like(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, patch: int = 32, dim: int = 768,
             depth: int = 12, heads: int = 12, mlp_dim: int = 3072) -> VisionTransformer:
    """ViT-B/32's shape by default (88 M parameters, 49 patches + class token)."""
    return VisionTransformer(image_size, patch, dim, depth, heads, mlp_dim, num_classes, in_channels)


def small_vit(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch: int = 7, dim: int = 64,
              depth: int = 4, heads: int = 4, mlp_dim: int = 128) -> VisionTransformer:
    """A tiny ViT for 28x28 images (16 patches of 7x7, width 64, 4 blocks: 17 linear layers and the patch conv, 0.14 M parameters)."""
    return VisionTransformer(image_size, patch, dim, depth, heads, mlp_dim, num_classes, in_channels)
