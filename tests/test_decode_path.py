"""The serving decode path (paper §6.1): the engine through the paged-attention kernel equals
the dense reference, a decode step reads nothing back from the device, and the page table
held on the device matches the host's lists."""
import random

import pytest
import torch
from conftest import memento_text, tiny_model

import model_runner as engine_module  # where the engine's sampler is called
from blocks import MementoConfig
from cuda_graphs import DecodeGraphs, capture_sizes
from engine import Engine, EngineConfig, SamplingParams
from memento_kernels import paged_attention
from tokenizer import Tokenizer

TOK = Tokenizer.byte_level()


def _requests(seed, n, blocks=(2, 4)):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = TOK.encode(TOK.chat_prompt("add " + " ".join(str(rng.randrange(10)) for _ in range(rng.randint(2, 6)))))
        out.append((prompt, TOK.encode(memento_text(rng, rng.randint(*blocks), block_len=(8, 20)))))
    return out


def _run(model, config, reqs, sampled):
    eng = Engine(model, TOK, config)
    seqs = [eng.add(p, forced=r) for p, r in reqs]
    seqs += [eng.add(p, SamplingParams(temperature=0.9, top_p=1.0, top_k=0, max_tokens=24, seed=7 + i))
             for i, (p, _) in enumerate(sampled)]
    eng.run()
    return seqs, eng


@pytest.mark.parametrize("mode", ["memento", "restart"])
def test_engine_on_the_paged_kernel_equals_the_reference_backend(monkeypatch, mode):
    """Replays (teacher-forced memento traces) and sampled requests through a pool small enough
    to preempt, fp32: logits, KV curves and sampled tokens with the paged kernel (interpreter)
    equal those of the dense reference within 1e-4."""
    model = tiny_model(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, seed=2)
    reqs, sampled = _requests(1, 3), _requests(2, 2)
    config = EngineConfig(MementoConfig(0), mode=mode, keep_logits=True, page_size=16, kv_cache_tokens=16 * 14,
                          max_num_seqs=5, max_num_batched_tokens=40, replay_chunk=4)
    monkeypatch.setenv("MEMENTO_ATTN_BACKEND", "torch")
    ref, ref_eng = _run(model, config, reqs, sampled)
    calls = []
    real = paged_attention.paged_attention
    monkeypatch.setattr(paged_attention, "paged_attention", lambda q, *a, **kw: calls.append(q.shape) or real(q, *a, **kw))
    monkeypatch.setenv("MEMENTO_ATTN_BACKEND", "triton")
    got, eng = _run(model, config, reqs, sampled)
    assert ref_eng.stats["preemptions"] > 0 and eng.stats["preemptions"] == ref_eng.stats["preemptions"]
    assert calls and max(shape[0] for shape in calls) > 1  # batched decode rows went through the kernel
    for a, b in zip(ref, got):
        assert a.stop_reason == b.stop_reason and a.curve == b.curve and a.tokens == b.tokens
        diff = (torch.stack(a.logits) - torch.stack(b.logits)).abs().max().item()
        assert diff <= 1e-4, diff


def test_a_decode_step_reads_nothing_back_from_the_device(monkeypatch):
    """With the host-planned batch in use, the model forward and the sampler of a step never call
    Tensor.item / tolist / cpu / __bool__ / __int__ (each a device sync on CUDA)."""
    model = tiny_model(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=16)
    eng = Engine(model, TOK, EngineConfig(MementoConfig(0), max_num_seqs=8))
    for i, (p, _) in enumerate(_requests(3, 6)):
        eng.add(p, SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.01, max_tokens=40, seed=i))
    while any(s.computed < len(s.prompt) for s in eng.sequences):  # every prompt prefilled
        eng.step()
    inside = []

    def guarded(fn):
        def wrapper(*a, **kw):
            inside.append(True)
            try:
                return fn(*a, **kw)
            finally:
                inside.pop()
        return wrapper

    def forbid(name):
        real = getattr(torch.Tensor, name)

        def method(self, *a, **kw):
            if inside:
                raise AssertionError(f"Tensor.{name} called inside a decode step")
            return real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, method)

    for name in ("item", "tolist", "cpu", "__bool__", "__int__"):
        forbid(name)
    monkeypatch.setattr(model, "hidden_states", guarded(model.hidden_states))
    monkeypatch.setattr(engine_module, "sample", guarded(engine_module.sample))
    steps = 0
    while eng.running and steps < 10:
        eng.step()
        steps += 1
    assert steps == 10 and not inside
    assert all(len(s.tokens) >= 10 for s in eng.sequences if s.stop_reason != "stop token")


def test_the_device_page_table_matches_the_host_lists():
    """After prefills, decoding, memento evictions and preemptions, each live sequence's row of
    the device page table lists its pages in order (what the kernel reads)."""
    model = tiny_model(layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16)
    eng = Engine(model, TOK, EngineConfig(MementoConfig(0), page_size=16, kv_cache_tokens=16 * 12, max_num_seqs=4,
                                          max_num_batched_tokens=24, replay_chunk=3, keep_cache=True))
    seqs = [eng.add(p, forced=r) for p, r in _requests(4, 4)]
    eng.run()
    cache = eng.cache
    assert eng.stats["preemptions"] > 0
    cache.batch(list(cache.seqs), [0] * len(cache.seqs)).upload()  # flush the entries not yet sent
    for sid, s in cache.seqs.items():
        assert cache.page_table[s.row, :len(s.pages)].tolist() == s.pages
    assert len({s.row for s in cache.seqs.values()}) == len(cache.seqs) >= 3 and len(seqs) == 4


def test_capture_sizes_are_vllms_buckets():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 8]
    assert capture_sizes(64) == [1, 2, 4] + list(range(8, 65, 8))
    sizes = capture_sizes(300)
    assert sizes[:3] == [1, 2, 4] and sizes[-3:] == [272, 288, 304] and 248 in sizes and 256 in sizes and 264 not in sizes
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_sizes(0)


def test_decode_steps_on_the_static_buffers_of_cuda_graphs_equal_eager_ones(monkeypatch):
    """The step cuda_graphs.py records, run eagerly on its static, padded buckets (interpreter):
    the same sampled tokens and KV curves as the ordinary eager step, with preemptions (a short
    pool); the padded rows of a bucket change nothing."""
    monkeypatch.setenv("MEMENTO_ATTN_BACKEND", "triton")
    model = tiny_model(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, seed=5)
    config = EngineConfig(MementoConfig(0), page_size=16, kv_cache_tokens=16 * 12, max_num_seqs=5,
                          max_num_batched_tokens=40)
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=60, seed=i) for i in range(5)]
    prompts = [p for p, _ in _requests(5, 5)]
    runs = []
    for graphs in (False, True):
        eng = Engine(model, TOK, config)
        assert eng.graphs is None  # never on the CPU
        if graphs:
            r = eng.runner
            r.graphs = DecodeGraphs(model, eng.cache, config.max_num_seqs, r.last_ids, ops=r.ops, record=False)
            used = []
            real = r.graphs.run
            r.graphs.run = lambda view, rows: used.append(len(view.seqs)) or real(view, rows)
        seqs = [eng.add(p, sp) for p, sp in zip(prompts, params)]
        eng.run()
        runs.append(([s.tokens for s in seqs], [s.curve for s in seqs], eng.stats["preemptions"]))
    assert runs[0] == runs[1] and runs[0][2] > 0
    assert used and set(used) - {1, 2, 4, 8}  # some batches were padded to a larger bucket
