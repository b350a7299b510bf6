"""Key/value cache for incremental decoding (TL's `HookedTransformerKeyValueCache`, same field names)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import Tensor

from hooklens.config import HookedTransformerConfig


@dataclass
class HookedTransformerKeyValueCacheEntry:
    past_keys: Tensor  # [b, past, h, dh]
    past_values: Tensor  # [b, past, h, dh]
    frozen: bool = False

    @classmethod
    def init_cache_entry(
        cls, cfg: HookedTransformerConfig, device, batch_size: int = 1
    ) -> "HookedTransformerKeyValueCacheEntry":
        empty = torch.empty(batch_size, 0, cfg.n_heads, cfg.d_head, device=device, dtype=cfg.dtype)
        return cls(past_keys=empty, past_values=empty.clone())

    def append(self, new_keys: Tensor, new_values: Tensor):
        """Return past + new keys and values; store them unless the cache is frozen."""
        keys = torch.cat([self.past_keys, new_keys], dim=1)
        values = torch.cat([self.past_values, new_values], dim=1)
        if not self.frozen:
            self.past_keys, self.past_values = keys, values
        return keys, values


@dataclass
class HookedTransformerKeyValueCache:
    entries: List[HookedTransformerKeyValueCacheEntry]
    previous_attention_mask: Tensor  # [b, past]
    frozen: bool = False

    @classmethod
    def init_cache(cls, cfg: HookedTransformerConfig, device, batch_size: int = 1) -> "HookedTransformerKeyValueCache":
        entries = [HookedTransformerKeyValueCacheEntry.init_cache_entry(cfg, device, batch_size)
                   for _ in range(cfg.n_layers)]
        return cls(entries=entries, previous_attention_mask=torch.empty(batch_size, 0, device=device, dtype=torch.long))

    def freeze(self) -> None:
        self.frozen = True
        for entry in self.entries:
            entry.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False
        for entry in self.entries:
            entry.frozen = False

    def append_attention_mask(self, attention_mask: Tensor) -> Tensor:
        attention_mask = attention_mask.to(self.previous_attention_mask.device)
        updated = torch.cat([self.previous_attention_mask, attention_mask], dim=-1)
        if not self.frozen:
            self.previous_attention_mask = updated
        return updated

    def __getitem__(self, idx: int) -> HookedTransformerKeyValueCacheEntry:
        return self.entries[idx]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def past_length(self) -> int:
        return self.entries[0].past_keys.shape[1] if self.entries else 0
