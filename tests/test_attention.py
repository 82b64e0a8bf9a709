"""memento_attention.attention (torch path) against SDPA and an element-by-element loop."""
import math

import pytest
import torch
import torch.nn.functional as F

from blocks import NEVER
from memento_attention import attention


def _qkv(B=2, Hq=4, Hkv=2, T=13, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g),
            torch.randn(B, Hkv, T, D, generator=g))


def test_plain_causal_matches_sdpa():
    q, k, v = _qkv()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (attention(q, k, v) - ref).abs().max() < 1e-5
    full = torch.full((2, 13), NEVER)
    assert torch.equal(attention(q, k, v, full), attention(q, k, v))


def test_mask_from_rule_elementwise():
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, T=9)
    mask_from = torch.tensor([[NEVER, 4, 4, NEVER, 6, 9, NEVER, 8, NEVER]])
    out = attention(q, k, v, mask_from)
    for i in range(9):
        keys = [j for j in range(9) if j <= i < mask_from[0, j]]
        for h in range(2):
            s = torch.stack([q[0, h, i] @ k[0, 0, j] for j in keys]) / math.sqrt(8)
            want = torch.softmax(s, 0) @ v[0, 0, keys]
            assert (out[0, h, i] - want).abs().max() < 1e-5


def test_queries_against_longer_keys_and_positions():
    q, k, v = _qkv(B=1, T=10)
    full = attention(q, k, v)
    assert (attention(q[:, :, -3:], k, v) - full[:, :, -3:]).abs().max() < 1e-6
    # explicit logical positions with a gap give the same answer as indices
    pos = torch.cat([torch.arange(5), torch.arange(5, 10) + 100])[None]
    out = attention(q[:, :, -3:], k, v, q_pos=pos[:, -3:], k_pos=pos)
    assert (out - full[:, :, -3:]).abs().max() < 1e-6


def test_bad_shapes():
    q, k, v = _qkv(Hq=3, Hkv=2)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, v)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="mask_from must be"):
        attention(q, k, v, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown backend"):
        attention(q, k, v, backend="cuda-magic")


@pytest.mark.parametrize("Tq", [13, 1, 4])
def test_sdpa_backend_matches_reference(Tq):
    q, k, v = _qkv(T=13, Hq=4, Hkv=1)
    q = q[:, :, -Tq:]
    mask_from = torch.full((2, 13), NEVER)
    mask_from[0, 2:6] = 9
    mask_from[1, 7:9] = 12
    for kw in ({}, {"q_pos": torch.arange(13 - Tq, 13).expand(2, Tq) + 5, "k_pos": torch.arange(13).expand(2, 13) + 5}):
        mf = mask_from + 5 if kw else mask_from
        ref = attention(q, k, v, mf, backend="torch", **kw)
        assert (attention(q, k, v, mf, backend="sdpa", **kw) - ref).abs().max() < 1e-5
