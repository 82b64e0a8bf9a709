"""model.py against HF transformers' Qwen3ForCausalLM (the independent reference)."""
import json

import pytest
import torch
from conftest import tiny_hf_model

from checkpoint import add_memento_tokens
from model import Qwen3, Qwen3Config
from tokenizer import Tokenizer

VOCAB = 300


def _ids(B=2, T=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tmp_path, tied):
    hf = tiny_hf_model(tied)
    hf.save_pretrained(tmp_path)
    ours = Qwen3.from_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    assert out.shape == (2, 23, VOCAB) and out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= 1e-4


def test_sharded_and_bf16_checkpoints(tmp_path):
    hf = tiny_hf_model(False)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        assert (Qwen3.from_pretrained(tmp_path / "sharded")(ids) - ref).abs().max().item() <= 1e-4
        hf16 = hf.to(torch.bfloat16)
        hf16.save_pretrained(tmp_path / "bf16")
        ours16 = Qwen3.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
        assert ours16.model.embed_tokens.weight.dtype == torch.float32
        from transformers import AutoModelForCausalLM

        # the same bf16-rounded weights, evaluated in fp32 by transformers
        ref16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()(ids).logits
        assert (ours16(ids) - ref16).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", [None, 30_000])
def test_our_save_loads_in_transformers(tmp_path, tied, shard):
    from transformers import AutoModelForCausalLM

    hf = tiny_hf_model(tied, seed=3)
    hf.save_pretrained(tmp_path / "src")
    ours = Qwen3.from_pretrained(tmp_path / "src")
    ours.save_pretrained(tmp_path / "out", max_shard_bytes=shard)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
        assert (ours(ids) - back(ids).logits).abs().max().item() <= 1e-4


def test_explicit_positions_offset(tmp_path):
    hf = tiny_hf_model(False)
    hf.save_pretrained(tmp_path)
    ours = Qwen3.from_pretrained(tmp_path)
    ids = _ids(B=1, T=19)
    for k in (1, 7, 1000):
        pos = torch.arange(19)[None] + k
        with torch.no_grad():
            ref = hf(ids, position_ids=pos).logits
            out = ours(ids, positions=pos)
        assert (out - ref).abs().max().item() <= 1e-4
    # RoPE is relative, so a uniform offset changes little; a gap (as after compaction) must
    # change the logits, and still agree with transformers.
    gap = torch.cat([torch.arange(9), torch.arange(9, 19) + 50])[None]
    with torch.no_grad():
        ref, out = hf(ids, position_ids=gap).logits, ours(ids, positions=gap)
        assert (out - ref).abs().max().item() <= 1e-4
        assert (out - ours(ids)).abs().max() > 1e-3


def test_rope_theta_top_level_or_nested():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    assert Qwen3Config.from_dict({**base, "rope_theta": 1234.0}).rope_theta == 1234.0
    nested = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 99.0}}
    cfg = Qwen3Config.from_dict(nested)
    assert cfg.rope_theta == 99.0 and cfg.head_dim == 4
    assert Qwen3Config.from_dict(cfg.to_dict()).rope_theta == 99.0


def test_bad_checkpoints_give_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tiny_hf_model(False)
    good = tmp_path / "good"
    hf.save_pretrained(good)
    cfg = json.loads((good / "config.json").read_text())
    weights = load_file(good / "model.safetensors")

    def variant(name, cfg_d, w):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg_d))
        save_file(w, d / "model.safetensors")
        return d

    no_field = variant("nofield", {k: v for k, v in cfg.items() if k != "num_key_value_heads"}, weights)
    with pytest.raises(ValueError, match="missing required field.*num_key_value_heads"):
        Qwen3.from_pretrained(no_field)
    w = dict(weights)
    del w["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        Qwen3.from_pretrained(variant("notensor", cfg, w))
    w = dict(weights)
    w["model.norm.weight"] = torch.ones(65)
    with pytest.raises(ValueError, match="'model.norm.weight' has shape \\(65,\\)"):
        Qwen3.from_pretrained(variant("shape", cfg, w))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        Qwen3.from_pretrained(tmp_path / "does" / "not" / "exist")
    bad = variant("truncated", cfg, weights)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:500])
    with pytest.raises(ValueError, match="unreadable safetensors file"):
        Qwen3.from_pretrained(bad)


def test_atomic_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import checkpoint as checkpoint_mod

    hf = tiny_hf_model(False)
    hf.save_pretrained(tmp_path / "src")
    ours = Qwen3.from_pretrained(tmp_path / "src")
    out = tmp_path / "ckpt"
    ours.save_pretrained(out)
    before = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        ours.model.norm.weight.add_(1.0)

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(checkpoint_mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ours.save_pretrained(out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "src"]  # no temp dir left


def _word_rows(table, tok, words):
    return torch.stack([table[tok.encode(" " + w)].float().mean(0) for w in words]).mean(0)


@pytest.mark.parametrize("tied", [False, True])
def test_memento_token_initialization(tmp_path, tied):
    from checkpoint import MEMENTO_TOKEN_SEEDS

    tok = Tokenizer.byte_level()
    # a byte-level vocab without memento tokens, as a pretrained checkpoint would have
    tok.hf_json["added_tokens"] = [t for t in tok.hf_json["added_tokens"] if t["content"] not in MEMENTO_TOKEN_SEEDS]
    tok = Tokenizer(tok.hf_json)
    assert "<|block_start|>" not in tok.special_ids
    hf = tiny_hf_model(tied, vocab=261)
    hf.save_pretrained(tmp_path)
    m = Qwen3.from_pretrained(tmp_path)
    ids = _ids(T=31) % 261
    with torch.no_grad():
        before_logits = m(ids)
    emb_before = m.model.embed_tokens.weight.detach().clone()
    head_before = m.lm_head.weight.detach().clone()
    new = add_memento_tokens(m, tok, noise_std=0.01, seed=0)
    assert sorted(new.values()) == [261, 262, 263, 264] and m.config.vocab_size == 265
    assert tok.encode("<|summary_end|>") == [new["<|summary_end|>"]]
    emb = m.model.embed_tokens.weight.detach()
    assert torch.equal(emb[:261], emb_before) and torch.equal(m.lm_head.weight[:261].detach(), head_before)
    if tied:
        assert m.lm_head.weight.data_ptr() == emb.data_ptr()
    tables = [(emb, emb_before)] + ([] if tied else [(m.lm_head.weight.detach(), head_before)])
    noise = []
    for table, old in tables:
        for t, i in new.items():
            noise.append(table[i] - _word_rows(old, tok, MEMENTO_TOKEN_SEEDS[t]))
    noise = torch.cat(noise)
    # Mean of the seed words, plus noise of std 0.01: check the scale, not exact values.
    assert noise.abs().mean() > 1e-3 and 0.005 < noise.std().item() < 0.02 and abs(noise.mean().item()) < 0.005
    with torch.no_grad():
        after = m(ids)
    assert (after[..., :261] - before_logits).abs().max().item() <= 1e-5
