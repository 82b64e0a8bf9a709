"""The compiled forward (model.compiled_ops under torch.compile, paper §6.1 serving) against the
eager one: a tiny model's prefill and decode steps through the engine, compiled on the CPU by
inductor, give the eager engine's tokens, and its logits within float rounding."""
import pytest
import torch

from blocks import MementoConfig
from conftest import tiny_model
from engine import Engine, EngineConfig
from model import EAGER_OPS, LayerOps, compiled_ops
from sampling import SamplingParams
from tokenizer import Tokenizer

TOK = Tokenizer.byte_level()


def _run(model, compile_):
    eng = Engine(model, TOK, EngineConfig(MementoConfig(0), compile=compile_, keep_logits=True, max_num_seqs=4,
                                          unbounded_kv_cache=True))
    assert (eng.runner.ops is EAGER_OPS) != compile_
    prompts = [TOK.prompt_ids(f"sum {n} blocks from 2") for n in (3, 5)]
    seqs = [eng.add(p, SamplingParams(temperature=t, top_k=0, top_p=1.0, max_tokens=12, seed=i, ignore_eos=True))
            for i, (p, t) in enumerate(zip(prompts, (0.0, 1.0)))]
    eng.run()
    return seqs


def test_compiled_engine_equals_eager():
    torch._dynamo.reset()
    model = tiny_model(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, seed=3)
    eager = _run(model, False)
    compiled = _run(model, True)
    for a, b in zip(eager, compiled):
        assert a.tokens == b.tokens and a.curve == b.curve
        assert len(a.logits) == len(b.logits) > 12
        for x, y in zip(a.logits, b.logits):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


def test_compiled_ops_are_the_same_functions():
    """compiled_ops wraps exactly the eager layer functions (nothing else is compiled)."""
    ops = compiled_ops()
    assert isinstance(ops, LayerOps)
    for name in ("attention_in", "attention_out_mlp", "final_norm", "rope_cos_sin"):
        assert getattr(ops, name)._torchdynamo_orig_callable is getattr(EAGER_OPS, name)
