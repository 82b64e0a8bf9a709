"""The workload of tests/test_tensor_parallel.py, run alike by one process (TP = 1) and by each
process of a tensor-parallel group (tests/tp_worker.py): a tiny random Qwen3 and requests that
prefill, decode, compact (teacher-forced memento traces), recompute (restart mode) and get
preempted (a pool too small for all of them at once)."""
import random

import torch

from blocks import MementoConfig
from conftest import memento_text, tiny_model
from engine import Engine, EngineConfig, Mode
from sampling import SamplingParams
from tokenizer import Tokenizer

TOK = Tokenizer.byte_level()


def model():
    """A 2-layer random Qwen3 with 4 KV heads (so that 2 processes hold 2 each)."""
    return tiny_model(layers=2, hidden=64, heads=8, kv_heads=4, head_dim=16, seed=7)


def run(m) -> dict:
    """Run the workload through one Engine on model m; what the test compares: per request its
    tokens, curve, preemptions and every position's logits; the pool's shape."""
    rng = random.Random(3)
    eng = Engine(m, TOK, EngineConfig(MementoConfig(0), page_size=16, kv_cache_tokens=16 * 14, max_num_seqs=4,
                                      max_num_batched_tokens=48, replay_chunk=5, keep_logits=True))
    seqs = []
    for i in range(4):  # teacher-forced traces, two in restart mode
        prompt = TOK.prompt_ids("trace " + "x" * rng.randint(3, 20))
        seqs.append(eng.add(prompt, forced=TOK.encode(memento_text(rng, n_blocks=3, block_len=(20, 40))),
                            mode=Mode.RESTART if i % 2 else Mode.MEMENTO))
    for i in range(2):  # sampled, greedy
        seqs.append(eng.add(TOK.prompt_ids(f"sum {i + 3} blocks"), SamplingParams(temperature=0, max_tokens=40,
                                                                                    ignore_eos=True)))
    eng.run()
    return {"tokens": [s.tokens for s in seqs], "curves": [s.curve for s in seqs],
            "preemptions": [s.preemptions for s in seqs], "stop": [s.stop_reason for s in seqs],
            "logits": [torch.stack(s.logits).tolist() for s in seqs],
            "kv_heads": eng.cache.n_kv_heads, "pool_bytes": eng.cache.k.numel() * eng.cache.k.element_size() * 2,
            "engine_preemptions": eng.stats["preemptions"]}
