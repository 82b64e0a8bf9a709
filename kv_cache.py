"""The compacting KV cache that makes the sawtooth (paper §6.1, §A.3).

Each layer stores K/V in a buffer [B, Hkv, capacity, D] together with every slot's logical
position and mask_from. Compaction physically removes slots: the survivors are gathered to
the front of the buffer and the row's length drops, so attention runs over fewer keys and the
freed slots are reused by the next tokens. The buffer grows by doubling when full and is
reallocated at half size when a compaction leaves it less than a quarter full, so allocated
memory follows the sawtooth too; `allocated_bytes` reports it honestly.

An empty slot has mask_from = -1: by the rule pos[j] <= q < mask_from[j] no query sees it,
so rows of different lengths share one tensor without any extra mask.
"""
from __future__ import annotations

import torch

from memento_attention import NEVER

EMPTY = -1


class LayerCache:
    """One layer's K/V slots. Shapes: k, v [B, Hkv, C, D]; pos, mask_from [B, C] int64;
    length [B] int64 (slots in use per row; slots >= length are empty)."""

    def __init__(self, B: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 64):
        self.k = torch.zeros(B, n_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(B, capacity, dtype=torch.int64, device=device)
        self.mask_from = torch.full((B, capacity), EMPTY, dtype=torch.int64, device=device)
        self.length = torch.zeros(B, dtype=torch.int64, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def _resize(self, capacity: int) -> None:
        n = min(self.capacity, capacity)
        k = self.k.new_zeros(self.k.shape[:2] + (capacity,) + self.k.shape[3:])
        v = torch.zeros_like(k)
        pos = self.pos.new_zeros(self.pos.shape[0], capacity)
        mf = self.mask_from.new_full((self.pos.shape[0], capacity), EMPTY)
        k[:, :, :n], v[:, :, :n], pos[:, :n], mf[:, :n] = self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :n], self.mask_from[:, :n]
        self.k, self.v, self.pos, self.mask_from = k, v, pos, mf

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, mask_from: torch.Tensor | None):
        """Append T new tokens to every row, at each row's own length.

        Args:
            k, v: [B, Hkv, T, D] new keys (RoPE already applied at their logical positions).
            pos: [B, T] int logical positions. mask_from: [B, T] or None (= NEVER).
        Returns:
            (k, v, pos, mask_from) over the used slots: [B, Hkv, S, D] x2, [B, S] x2, with
            S = the longest row; the caller attends with memento_attention.attention.
        """
        B, T = pos.shape
        need = int(self.length.max()) + T
        if need > self.capacity:
            self._resize(max(need, 2 * self.capacity))
        slot = self.length[:, None] + torch.arange(T, device=pos.device)  # [B, T]
        rows = torch.arange(B, device=pos.device)[:, None].expand(B, T)
        self.k[rows, :, slot] = k.permute(0, 2, 1, 3).to(self.k.dtype)
        self.v[rows, :, slot] = v.permute(0, 2, 1, 3).to(self.v.dtype)
        self.pos[rows, slot] = pos
        self.mask_from[rows, slot] = NEVER if mask_from is None else mask_from.to(torch.int64)
        self.length += T
        S = int(self.length.max())
        return self.k[:, :, :S], self.v[:, :, :S], self.pos[:, :S], self.mask_from[:, :S]

    def keep(self, keep: torch.Tensor) -> None:
        """Compact: keep the slots where keep [B, S] is True, gathered to the front, in order."""
        B, S = keep.shape
        keep = keep & (torch.arange(S, device=keep.device) < self.length[:, None])
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept slots first
        self.k[:, :, :S] = self.k[:, :, :S].gather(2, order[:, None, :, None].expand_as(self.k[:, :, :S]))
        self.v[:, :, :S] = self.v[:, :, :S].gather(2, order[:, None, :, None].expand_as(self.v[:, :, :S]))
        self.pos[:, :S] = self.pos[:, :S].gather(1, order)
        self.mask_from[:, :S] = self.mask_from[:, :S].gather(1, order)
        self.length = keep.sum(1)
        self.mask_from[torch.arange(self.capacity, device=keep.device) >= self.length[:, None]] = EMPTY
        longest = int(self.length.max())
        if self.capacity > 64 and longest < self.capacity // 4:
            self._resize(max(64, 2 * longest))


class KVCache:
    """All layers' caches for B sequences, plus the KV accounting of §A.3.1.

    Every layer evicts the same slots, so one decision (`evict`) compacts all of them.

    Counters, per row (token counts; bytes = tokens x bytes_per_token):
        curve[r]: tokens in the cache after each token of the sequence was appended,
            including prompt tokens (the §A.3.1 replay); peak = max, AUC = sum (token·steps).
    """

    def __init__(self, model_config, B: int, dtype: torch.dtype, device, capacity: int = 64):
        c = model_config
        self.layers = [LayerCache(B, c.num_key_value_heads, c.head_dim, dtype, device, capacity)
                       for _ in range(c.num_hidden_layers)]
        self.B = B
        elt = torch.tensor([], dtype=dtype).element_size()
        # 2 (K and V) x layers x kv heads x head_dim x bytes per element (§A.3.1)
        self.bytes_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elt
        self.curve: list[list[int]] = [[] for _ in range(B)]
        self.peak_allocated_bytes = 0

    @property
    def length(self) -> torch.Tensor:
        """[B] int64: tokens held per row (the same in every layer)."""
        return self.layers[0].length

    def record(self, n_new: torch.Tensor | list[int], active: list[bool] | None = None) -> None:
        """Append to each active row's curve the cache size after each of its n_new tokens
        (the last entry is the current length; earlier ones count up to it)."""
        L = self.length.tolist()
        for r in range(self.B):
            if active is None or active[r]:
                n = int(n_new[r])
                self.curve[r].extend(range(L[r] - n + 1, L[r] + 1))
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)

    def evict(self, row: int, lo: int, hi: int) -> int:
        """Physically remove row's slots with logical position in [lo, hi]; returns how many."""
        L = self.layers[0]
        S = int(L.length.max())
        pos = L.pos[:, :S]
        drop = torch.zeros_like(pos, dtype=torch.bool)
        drop[row] = (pos[row] >= lo) & (pos[row] <= hi) & (torch.arange(S, device=pos.device) < L.length[row])
        n = int(drop.sum())
        if n:
            for layer in self.layers:
                layer.keep(~drop)
        return n

    def evict_masked(self, next_pos: torch.Tensor) -> None:
        """Remove every slot whose mask has started by each row's next position [B]
        (mask_from <= next_pos), e.g. spans masked inside a prefilled chunk, or padding."""
        L = self.layers[0]
        S = int(L.length.max())
        keep = L.mask_from[:, :S] > next_pos[:, None]
        if not bool(keep.all()):
            for layer in self.layers:
                layer.keep(keep)

    @property
    def allocated_bytes(self) -> int:
        """Bytes held by the K/V buffers right now (capacity, not just used slots)."""
        return sum(2 * l.k.numel() * l.k.element_size() for l in self.layers)

    def row_copy(self, row: int) -> "KVCache":
        """A B=1 cache holding a copy of one row (restart-mode recomputation works on it)."""
        other = KVCache.__new__(KVCache)
        other.B, other.bytes_per_token, other.curve, other.peak_allocated_bytes = 1, self.bytes_per_token, [[]], 0
        other.layers = []
        for l in self.layers:
            n = int(l.length[row])
            c = LayerCache.__new__(LayerCache)
            c.k, c.v = l.k[row:row + 1, :, :max(n, 1)].clone(), l.v[row:row + 1, :, :max(n, 1)].clone()
            c.pos, c.mask_from = l.pos[row:row + 1, :max(n, 1)].clone(), l.mask_from[row:row + 1, :max(n, 1)].clone()
            c.length = l.length[row:row + 1].clone()
            other.layers.append(c)
        return other

    def write_row(self, row: int, src: "KVCache") -> None:
        """Overwrite one row with the single row of `src` (inverse of row_copy)."""
        for l, s in zip(self.layers, src.layers):
            n = int(s.length[0])
            if n > l.capacity:
                l._resize(max(n, 2 * l.capacity))
            l.k[row, :, :n], l.v[row, :, :n] = s.k[0, :, :n], s.v[0, :, :n]
            l.pos[row, :n], l.mask_from[row, :n] = s.pos[0, :n], s.mask_from[0, :n]
            l.mask_from[row, n:] = EMPTY
            l.length[row] = n
