"""train_rl.py: masked RL (CISPO + KL, paper §5/§A.2.3) against direct computations and the engine."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, free_port, killed_after
from safetensors.torch import load_file

import sft
import train_rl
from checkpoint import local_checkpoint
from evaluation import toy_problems
from blocks import MementoTokens
from model import Qwen3
from tokenizer import Tokenizer

SMALL = ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--no-progress", "--eval-samples", "0"]


@pytest.fixture(scope="module")
def policy(toy_policy):
    """A small model trained briefly on the toy format (stage 1), so that its samples hold
    several completed blocks (conftest.toy_policy, shared with other modules)."""
    return toy_policy


def _rollouts(path, **kw):
    model = Qwen3.from_pretrained(local_checkpoint(path)).eval()
    tok = Tokenizer.from_dir(local_checkpoint(path))
    args = SimpleNamespace(temperature=1.0, max_block_tokens=None, max_num_seqs=64, group_size=4, max_new_tokens=200)
    vars(args).update(kw)
    return model, tok, train_rl.rollouts(model, tok, toy_problems(6, seed=2), args, step_seed=7)


def test_training_logprobs_equal_engine_sampling_logprobs(policy):
    """The central guarantee: one training forward under the mask built from a rollout's own
    tokens gives the log-probs the engine sampled from, token for token."""
    model, tok, rows = _rollouts(policy)
    assert sum(r["blocks"] >= 2 for r in rows) >= 4, [r["blocks"] for r in rows]
    ids, labels, old, mask = train_rl.collate(rows, tok.token_id("<|endoftext|>"))
    with torch.no_grad():
        logp = train_rl.token_logprobs(model, ids, labels, MementoTokens.from_tokenizer(tok))
    assert mask.sum() == sum(len(r["response"]) for r in rows)
    assert (logp - old)[mask].abs().max().item() <= 1e-4


def test_block_cap_holds_and_forced_tokens_are_not_actions(policy):
    cap = 4
    model, tok, rows = _rollouts(policy, max_block_tokens=cap)
    T = MementoTokens.from_tokenizer(tok)
    forced = 0
    for r in rows:
        start = None
        for i, t in enumerate(r["response"]):
            if t == T.block_start:
                start = i
            elif t == T.block_end and start is not None:
                assert i - start - 1 <= cap
                start = None
        forced += sum(lp != lp for lp in r["old_logp"])  # NaN marks a token the engine forced
    assert forced > 0
    ids, labels, old, mask = train_rl.collate(rows, tok.token_id("<|endoftext|>"))
    assert mask.sum() == sum(len(r["response"]) for r in rows) - forced
    with torch.no_grad():  # the forced tokens shape the mask; the sampled ones keep the guarantee
        logp = train_rl.token_logprobs(model, ids, labels, T)
    assert (logp - old)[mask].abs().max().item() <= 1e-4


def _direct_cispo(logp, old, ref, adv, mask, group, el, eh, beta):
    total = []
    for g in sorted(set(group.tolist())):
        s, n = 0.0, 0
        for i in range(logp.shape[0]):
            if group[i] != g:
                continue
            for t in range(logp.shape[1]):
                if not mask[i, t]:
                    continue
                r = float(torch.exp(logp[i, t].detach() - old[i, t]))
                w = min(max(r, 1 - el), 1 + eh)
                d = ref[i, t] - logp[i, t]
                s = s - w * adv[i] * logp[i, t] + beta * (torch.exp(d) - d - 1)
                n += 1
        total.append(s / n)
    return sum(total) / len(total)


def test_cispo_loss_and_gradient_equal_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    N, T = 6, 5
    old = -torch.rand(N, T, generator=g) * 3
    logp0 = old + torch.randn(N, T, generator=g) * 0.4  # ratios well outside [0.8, 1.2] for some tokens
    ref = old + torch.randn(N, T, generator=g) * 0.2
    adv = torch.randn(N, generator=g)
    mask = torch.rand(N, T, generator=g) > 0.2
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    a = logp0.clone().requires_grad_(True)
    loss, stats = train_rl.cispo_loss(a, old, ref, adv, mask, group, 0.2, 0.2, 0.05)
    loss.backward()
    b = logp0.clone().requires_grad_(True)
    direct = _direct_cispo(b, old, ref, adv, mask, group, 0.2, 0.2, 0.05)
    direct.backward()
    assert torch.allclose(loss, direct, atol=1e-6) and torch.allclose(a.grad, b.grad, atol=1e-6)
    ratio = torch.exp(logp0 - old)
    outside = mask & ((ratio < 0.8) | (ratio > 1.2))
    assert outside.any() and (a.grad[outside] != 0).all()  # clipped weight, gradient kept (unlike PPO)
    assert stats["clip_frac"] == pytest.approx(float(outside.sum() / mask.sum()))


def test_equal_rewards_give_no_policy_gradient():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    adv = train_rl.group_advantages(rewards)
    assert (adv[0] == 0).all() and adv[1, 1] > 0 > adv[1, 0]
    centered = torch.tensor([[-1 / 3, 2 / 3, -1 / 3]])
    assert torch.allclose(adv[1], (centered / torch.cat([torch.zeros(1, 3), centered]).std())[0])
    logp = torch.randn(3, 4).requires_grad_(True)
    loss, _ = train_rl.cispo_loss(logp, logp.detach(), logp.detach(), adv[0], torch.ones(3, 4, dtype=torch.bool),
                                  torch.zeros(3, dtype=torch.long), beta=0.0)
    loss.backward()
    assert (logp.grad == 0).all()


def test_kl_k3_zero_at_equality_and_direct_otherwise():
    x = torch.tensor([-1.0, -2.0, -0.5])
    assert (train_rl.kl_k3(x, x) == 0).all()
    y = torch.tensor([-1.5, -1.0, -0.5])
    want = torch.tensor([pow(2.718281828459045, -0.5) + 0.5 - 1, pow(2.718281828459045, 1.0) - 1.0 - 1, 0.0])
    got = train_rl.kl_k3(x, y)
    assert torch.allclose(got, want, atol=1e-6) and (got[:2] > 0).all()


RL = ["--prompts-per-step", "4", "--group-size", "4", "--minibatches", "2", "--eval-samples", "0", "--no-progress",
      "--save-every", "2", "--max-steps", "4"]


def test_resume_after_2_of_4_steps_is_exact(policy, tmp_path):
    straight = tmp_path / "straight"
    train_rl.main(["--init-from", str(policy), *RL, "--out", str(straight)])
    killed_after("step-000002", train_rl.main, ["--init-from", str(policy), *RL, "--out", str(tmp_path / "resumed")])
    train_rl.main(["--init-from", str(policy), *RL, "--out", str(tmp_path / "resumed"), "--resume"])
    a = load_file(local_checkpoint(straight) / "model.safetensors")
    b = load_file(local_checkpoint(tmp_path / "resumed") / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    keys = ("reward", "response_tokens", "blocks", "kl", "clip_frac", "loss")
    assert [[e[k] for k in keys] for e in la] == [[e[k] for k in keys] for e in lb] and len(la) == 4


def test_rows_without_answer_are_skipped_and_counted(policy, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"problem": "sum 3 blocks from 1", "answer": "5"}, {"problem": "no answer"},
            {"problem": "What is 2+2?", "answer": "4"}, {"problem": "x", "answer": ""}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_rl.main(["--init-from", str(policy), "--data", str(data), "--prompts-per-step", "2", "--group-size", "2",
                   "--minibatches", "1", "--max-steps", "1", "--max-new-tokens", "16", "--no-progress",
                   "--eval-samples", "0", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert f"{data}: 2 records skipped: answer: missing: 1 (line 2); answer: empty: 1 (line 4)" in out
    assert len((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--group-size", "1"], "--group-size 1 gives every rollout an advantage of 0"),
    (["--minibatches", "9", "--prompts-per-step", "4"], "--minibatches 9 exceeds the 4 groups each of 1 process(es)"),
    (["--temperature", "0.7"], "--temperature 0.7: RL samples at temperature 1"),
    (["--fsdp"], "--fsdp shards over processes"),
])
def test_bad_input_one_line(args, message, capsys):
    with pytest.raises(SystemExit):
        train_rl.parse_args(args)
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_minibatches_are_checked_against_each_process_share(monkeypatch, capsys):
    """8 processes, 16 prompts, 4 minibatches: each process trains on 2 groups, so it would get
    empty minibatches; refused at parse time with one line (1 process: fine)."""
    train_rl.parse_args(["--prompts-per-step", "16", "--minibatches", "4"])
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(SystemExit):
        train_rl.parse_args(["--prompts-per-step", "16", "--minibatches", "4"])
    err = capsys.readouterr().err
    assert "exceeds the 2 groups each of 8 process(es)" in err and len(err.strip().splitlines()) == 1


def test_cispo_without_a_lower_bound_by_default():
    """The default (eps_low None, as MiniMax-M1) equals the direct computation with no lower clip:
    a ratio far below 1 keeps its small weight instead of being raised to 1 - eps_low."""
    g = torch.Generator().manual_seed(1)
    N, T = 4, 6
    old = -torch.rand(N, T, generator=g) * 3
    logp0 = old + torch.randn(N, T, generator=g) * 0.6
    ref = old.clone()
    adv = torch.randn(N, generator=g)
    mask = torch.ones(N, T, dtype=torch.bool)
    group = torch.tensor([0, 0, 1, 1])
    a = logp0.clone().requires_grad_(True)
    loss, stats = train_rl.cispo_loss(a, old, ref, adv, mask, group, beta=0.0)
    b = logp0.clone().requires_grad_(True)
    direct = _direct_cispo(b, old, ref, adv, mask, group, float("inf"), 0.2, 0.0)
    assert torch.allclose(loss, direct, atol=1e-6)
    ratio = torch.exp(logp0 - old)
    assert (ratio < 0.8).any()  # a lower bound of 0.2 would have changed these tokens' weights
    assert stats["clip_frac"] == pytest.approx(float((ratio > 1.2).sum() / mask.sum()))


def test_logprobs_agree_in_bf16_with_the_fp32_lm_head(policy):
    """Rollouts and the training forward both under CPU bf16 autocast, the same rollouts (same
    seeds) with the LM head in fp32 (what train_rl.py sets) and in bf16. Measured here
    (2026-12-02): fp32 head mean 0.0012 / max 0.110 nats per token, bf16 head mean 0.0026 /
    max 0.072: the fp32 head halves the mean disagreement; what is left comes from the bf16
    layers, whose matmuls round differently in a decode step and in a whole-sequence forward."""
    tok = Tokenizer.from_dir(local_checkpoint(policy))
    args = SimpleNamespace(temperature=1.0, max_block_tokens=None, max_num_seqs=64, group_size=4, max_new_tokens=200)
    stats = {}
    for fp32_head in (True, False):
        model = Qwen3.from_pretrained(local_checkpoint(policy)).eval()
        model.fp32_lm_head = fp32_head
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows = train_rl.rollouts(model, tok, toy_problems(6, seed=2), args, step_seed=7)
            ids, labels, old, mask = train_rl.collate(rows, tok.token_id("<|endoftext|>"))
            with torch.no_grad():
                logp = train_rl.token_logprobs(model, ids, labels, MementoTokens.from_tokenizer(tok))
        diff = (logp - old)[mask].abs()
        stats[fp32_head] = (diff.mean().item(), diff.max().item())
    assert stats[True][0] <= 0.002 and stats[True][1] <= 0.15, stats
    assert stats[True][0] < stats[False][0], stats


def test_negative_control_an_unmasked_forward_disagrees(policy):
    """Without the memento mask (plain causal attention over the whole rollout) the training
    forward's log-probs differ from what the engine sampled from on multi-block rollouts: the
    equality above is the mask's doing, not an accident of the model."""
    model, tok, rows = _rollouts(policy)
    ids, labels, old, mask = train_rl.collate(rows, tok.token_id("<|endoftext|>"))
    with torch.no_grad():
        plain = -model(ids, labels=labels)
    assert (plain - old)[mask].abs().max().item() > 0.1


def test_sharded_rollouts_union_equals_one_process(policy, monkeypatch):
    """Two processes' shares (problems 0, 2, 4 and 1, 3, 5), exchanged as all_gather_object
    would, equal one process generating all six problems: the same tokens, rewards and so
    advantages, and log-probs within 1e-4 (other batches round differently)."""
    model = Qwen3.from_pretrained(local_checkpoint(policy)).eval()
    tok = Tokenizer.from_dir(local_checkpoint(policy))
    args = SimpleNamespace(temperature=1.0, max_block_tokens=None, max_num_seqs=64, group_size=4, max_new_tokens=200,
                           fsdp=False)
    problems = toy_problems(6, seed=2)
    one = train_rl.sharded_rollouts(model, tok, problems, args, 7, rank=0, world=1)
    shares = [train_rl.rollouts(model, tok, problems[r::2], args, 7) for r in range(2)]
    assert {r["group"] for r in shares[0]}.isdisjoint({r["group"] for r in shares[1]})

    def all_gather_object(out, mine):  # rank 0's view of the exchange
        out[:] = shares
    monkeypatch.setattr(train_rl.dist, "all_gather_object", all_gather_object)
    two = train_rl.sharded_rollouts(model, tok, problems, args, 7, rank=0, world=2)
    drop = ("old_logp",)  # the same up to float rounding: the batches differ (checked below)
    assert [{k: v for k, v in r.items() if k not in drop} for r in two] == \
        [{k: v for k, v in r.items() if k not in drop} for r in one]
    for a, b in zip(two, one):
        assert torch.allclose(torch.tensor(a["old_logp"]), torch.tensor(b["old_logp"]), atol=1e-4, equal_nan=True)
    rewards = lambda rows: torch.tensor([r["reward"] for r in rows]).view(6, 4)  # noqa: E731
    assert torch.equal(train_rl.group_advantages(rewards(two)), train_rl.group_advantages(rewards(one)))


def test_fsdp_processes_generate_disjoint_shares_and_shard_the_reference(policy, tmp_path):
    """Two gloo processes under --fsdp (tests/rl_shards_worker.py, train_rl's own setup): each
    decodes only its problems through the generation copy refreshed from the shards, and the
    exchanged rollouts equal one unsharded process's (tokens, rewards, so advantages; log-probs
    within 1e-4); the sharded reference holds half its bytes on each process and gives the
    unsharded reference's log-probs."""
    out = tmp_path / "shares.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                        "tests/rl_shards_worker.py", str(local_checkpoint(policy)), str(out)], cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    got = json.loads(out.read_text())
    (a, b) = got["shares"]
    assert sorted(a["generated"] + b["generated"]) == list(range(6)) and not set(a["generated"]) & set(b["generated"])

    model, tok, one = _rollouts(policy)
    two = got["rows"]
    drop = ("old_logp",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in two] == \
        [{k: v for k, v in r.items() if k not in drop} for r in one]
    for x, y in zip(two, one):
        assert torch.allclose(torch.tensor(x["old_logp"]), torch.tensor(y["old_logp"]), atol=1e-4, equal_nan=True)

    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert a["ref_bytes"] + b["ref_bytes"] == full and max(a["ref_bytes"], b["ref_bytes"]) <= 0.55 * full
    model.fp32_lm_head = True
    ids, labels, _, mask = train_rl.collate(one[:4], tok.token_id("<|endoftext|>"))
    with torch.no_grad():
        want = train_rl.token_logprobs(model, ids, labels, MementoTokens.from_tokenizer(tok))
    assert torch.allclose(torch.tensor(got["ref_logp"])[mask], want[mask], atol=1e-4)


def test_micro_batches_sum_to_the_minibatch_loss():
    """--micro-batch-size: the minibatch split into micro-batches of 1, 2 and 3 rollouts, each
    weighted by group_norms of the whole minibatch, gives the whole minibatch's loss and
    gradient (the group mean of token means, written out in _direct_cispo)."""
    g = torch.Generator().manual_seed(3)
    N, T = 6, 7
    old = -torch.rand(N, T, generator=g) * 3
    logp0 = old + torch.randn(N, T, generator=g) * 0.3
    ref = old + torch.randn(N, T, generator=g) * 0.2
    adv = torch.randn(N, generator=g)
    mask = torch.rand(N, T, generator=g) > 0.3
    group = torch.tensor([4, 4, 9, 9, 9, 1])
    b = logp0.clone().requires_grad_(True)
    direct = _direct_cispo(b, old, ref, adv, mask, group, float("inf"), 0.2, 0.05)
    direct.backward()
    norm = train_rl.group_norms(group, mask.sum(1))
    for size in (1, 2, 3):
        a = logp0.clone().requires_grad_(True)
        total = 0.0
        for j in range(0, N, size):
            part = slice(j, j + size)
            loss, _ = train_rl.cispo_loss(a[part], old[part], ref[part], adv[part], mask[part], beta=0.05,
                                          norm=norm[part])
            loss.backward()
            total += float(loss.detach())
        assert abs(total - float(direct.detach())) < 1e-6 and torch.allclose(a.grad, b.grad, atol=1e-6), size


def test_rollout_pool_is_bounded_and_in_the_compute_dtype(policy, monkeypatch):
    """--kv-cache-gib sizes the rollout pool in the compute dtype's bytes per token (bf16 under
    autocast: twice the tokens of fp32 for the same GiB), and rollouts under autocast store
    bf16 K/V."""
    model = Qwen3.from_pretrained(local_checkpoint(policy)).eval()
    args = SimpleNamespace(max_block_tokens=None, max_num_seqs=8, kv_cache_gib=0.001)
    c = model.config
    per_token_fp32 = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    fp32 = train_rl.rollout_engine_config(model, args)
    bf16 = train_rl.rollout_engine_config(model, args, torch.bfloat16)
    assert fp32.kv_cache_tokens == int(0.001 * 2**30) // per_token_fp32
    assert bf16.kv_cache_tokens == int(0.001 * 2**30) // (per_token_fp32 // 2)
    pools = []
    real = train_rl.Engine

    def engine(*a, **kw):
        eng = real(*a, **kw)
        pools.append(eng.cache.dtype)
        return eng
    monkeypatch.setattr(train_rl, "Engine", engine)
    tok = Tokenizer.from_dir(local_checkpoint(policy))
    args = SimpleNamespace(temperature=1.0, max_block_tokens=None, max_num_seqs=8, group_size=2, max_new_tokens=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_rl.rollouts(model, tok, toy_problems(1, seed=0), args, step_seed=0)
    train_rl.rollouts(model, tok, toy_problems(1, seed=0), args, step_seed=0)
    assert pools == [torch.bfloat16, torch.float32]
