"""A tiny random-initialised two-tower model for tests: small, fast, with BatchNorm in it."""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flyp.models.base import ModelBundle, image_transforms


class WordHashTokenizer:
    """Words hashed into a fixed vocabulary; id 0 is padding."""

    all_special_ids = (0,)  # as Hugging Face tokenizers name theirs

    def __init__(self, vocab_size: int = 1000, context_length: int = 16):
        self.vocab_size = vocab_size
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> Tensor:
        rows = [
            [
                1 + zlib.crc32(w.encode()) % (self.vocab_size - 1)
                for w in t.lower().replace(".", " ").split()
            ]
            for t in texts
        ]
        length = min(self.context_length, max(1, max(len(r) for r in rows)))
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for i, r in enumerate(rows):
            r = r[:length]
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out


class TinyCLIP(nn.Module):
    def __init__(
        self, embed_dim: int = 32, width: int = 16, vocab_size: int = 1000, dropout: float = 0.0
    ):
        super().__init__()
        self.visual = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, embed_dim),
        )
        self.token_embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.text_projection = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)  # as in real text towers: training draws random masks
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: Tensor) -> Tensor:
        return self.visual(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        mask = (tokens != 0).unsqueeze(-1).float()
        pooled = (self.token_embedding(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.text_projection(self.dropout(F.gelu(pooled)))


def load_tiny(image_size: int | None = None, seed: int = 0, dropout: float = 0.0) -> ModelBundle:
    size = image_size or 32
    torch.manual_seed(seed)
    model = TinyCLIP(dropout=dropout)
    train_tf, eval_tf = image_transforms(
        size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_scale=(0.7, 1.0)
    )
    return ModelBundle(model, WordHashTokenizer(), train_tf, eval_tf, spec="tiny", image_size=size)
