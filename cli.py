"""Command-line plumbing shared by the scripts: one-line errors and checked argument types.

A bad argument ends the program with exactly one line on stderr naming the argument, what
was wrong and what to pass; never a traceback, never a silent substitute. Defaults are shown
in --help.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from blocks import MementoConfig
from data.records import BAD_RECORDS
from engine import EngineConfig, load
from kv_cache import kv_bytes_per_token
from sampling import MAX_TEMPERATURE, MIN_TEMPERATURE, SamplingParams

DEFAULT_CHECKPOINT = "out/stage2"  # where `python train_sft.py --stage 2` writes its run


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every default (but for flags
    that are off or unset by default, whose help says what happens then)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: "prog: error: message (see --help)", exit status 2."""

    def __init__(self, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kw)

    def error(self, message: str):
        """Print one line and exit 2 (argparse prints the usage block too)."""
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _number(kind, low=None, high=None, low_open=False, high_open=False, what=""):
    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if x != x:  # NaN passes every comparison
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if (low is not None and (x < low or (low_open and x == low))) or (high is not None and (x > high or (high_open and x == high))):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return x
    parse.__name__ = what or kind.__name__
    return parse


positive_int = _number(int, 1, what="use an integer >= 1")
nonnegative_int = _number(int, 0, what="use an integer >= 0")
positive_float = _number(float, 0.0, low_open=True, what="use a number > 0")
fraction = _number(float, 0.0, 1.0, high_open=True, what="use a number in [0, 1)")
probability = _number(float, 0.0, 1.0, low_open=True, what="use a number in (0, 1]")
_any_temperature = _number(float, 0.0, MAX_TEMPERATURE, what=f"use 0 (greedy) or a number in [{MIN_TEMPERATURE:g}, "
                           f"{MAX_TEMPERATURE:g}]")


def temperature(text: str) -> float:
    """--temperature (paper §6.1 sampling): 0 (greedy) or a number in [MIN_TEMPERATURE,
    MAX_TEMPERATURE] (sampling.py: below it float32 logits overflow). Raises
    argparse.ArgumentTypeError otherwise (one line through ArgumentParser.error)."""
    x = _any_temperature(text)
    if 0 < x < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"{text} is out of range: use 0 (greedy) or a number in "
                                         f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
    return x
unit_interval = _number(float, 0.0, 1.0, what="use a number in [0, 1]")


def add_bad_records_arg(ap: ArgumentParser, default: str) -> None:
    """--bad-records error|skip: what a record that fails its schema does (data/records.py):
    stop the run with one line naming its file, line and field, or be skipped and counted by
    reason with its line numbers. Evaluation and replay default to error, training to skip."""
    ap.add_argument("--bad-records", choices=BAD_RECORDS, default=default,
                    help="a data record that fails its check: 'error' stops with FILE:LINE: field: what is wrong; "
                         "'skip' leaves it out and reports the skips by reason")


def compilation_config(text: str) -> dict:
    """--compilation-config JSON (vLLM's keys) as EngineConfig fields: "mode" 0 (no
    torch.compile) or 3 (compile; vLLM's default level) -> compile, "cudagraph_mode" "NONE" or
    "FULL_DECODE_ONLY" -> cudagraph_mode. Raises argparse.ArgumentTypeError (one line) for
    anything else."""
    import json

    try:
        d = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON; e.g. '{{\"mode\": 0}}'") from None
    if not isinstance(d, dict) or set(d) - {"mode", "cudagraph_mode"}:
        raise argparse.ArgumentTypeError(f"{text!r}: use a JSON object with keys mode and/or cudagraph_mode")
    out = {}
    if "mode" in d:
        if d["mode"] not in (0, 3):
            raise argparse.ArgumentTypeError(f"mode {d['mode']!r}: use 0 (no torch.compile) or 3 (torch.compile)")
        out["compile"] = d["mode"] == 3
    if "cudagraph_mode" in d:
        if d["cudagraph_mode"] not in ("NONE", "FULL_DECODE_ONLY"):
            raise argparse.ArgumentTypeError(f"cudagraph_mode {d['cudagraph_mode']!r}: use NONE or FULL_DECODE_ONLY")
        out["cudagraph_mode"] = d["cudagraph_mode"]
    return out


def check_device(ap: ArgumentParser, device: str) -> str:
    """'cpu', 'cuda' or 'cuda:N' that exists here; otherwise ap.error (one line, exit 2)."""
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            ap.error(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        idx = device.partition(":")[2]
        if idx and (not idx.isdigit() or int(idx) >= torch.cuda.device_count()):
            ap.error(f"--device {device}: no such GPU (this machine has {torch.cuda.device_count()})")
        return device
    ap.error(f"--device {device!r}: unknown device; use cpu, cuda or cuda:N")


def add_generation_args(ap: ArgumentParser, max_new_tokens: int) -> None:
    """The flags of every script that generates through engine.Engine (generate.py, eval.py):
    masking with the official engine's names (paper §4), sampling with the paper's defaults
    (§6.1), the engine's serving options with vLLM's names, device and dtype. Read them back
    with `engine_config` (and `sampling_params`)."""
    ap.add_argument("--keep-last-n-blocks", type=int, default=0, help="-1 never mask, 0 mask at the memento's end, N keep N")
    ap.add_argument("--mask-delimiters", action="store_true", help="also evict a block's delimiters")
    ap.add_argument("--keep-last-block-for-answer", action="store_true", help="the last block stays for the answer")
    ap.add_argument("--max-block-tokens", type=positive_int, default=None, help="force <|block_end|> at this block length")
    add_sampling_args(ap, max_new_tokens)
    ap.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed (the same tokens on CPU and CUDA, in any batch)")
    ap.add_argument("--max-num-seqs", type=positive_int, default=256, help="sequences decoded together")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--kv-cache-tokens", type=positive_int, default=None,
                        help="KV pool size in tokens (default: --gpu-memory-utilization of the GPU, or 4 GiB on the CPU)")
    budget.add_argument("--kv-cache-gib", type=positive_float, default=None, help="KV pool size in GiB")
    budget.add_argument("--unbounded-kv-cache", action="store_true", help="no KV budget: the pool grows as needed")
    ap.add_argument("--gpu-memory-utilization", type=probability, default=0.9,
                    help="share of GPU memory for weights, activations and the KV pool (default pool size on CUDA)")
    ap.add_argument("--page-size", type=positive_int, default=16, help="token slots per KV page")
    ap.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                    help="tokens per engine step, decode and prefill chunks together (>= --max-num-seqs)")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="no torch.compile and no CUDA graphs (vLLM's meaning; both are used on CUDA only)")
    ap.add_argument("--compilation-config", "-O", type=compilation_config, default={},
                    help="JSON, vLLM's names: {\"mode\": 0} turns torch.compile off, {\"cudagraph_mode\": \"NONE\"} "
                         "the CUDA graphs (decode steps then run the same bucketed kernels eagerly)")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="plan and launch each step before the last one's tokens are read back (default: on CUDA)")
    ap.add_argument("--tensor-parallel-size", type=positive_int, default=1,
                    help="processes (GPUs) one model is split over (vLLM's name; under torchrun, with "
                         "--nproc_per_node a multiple of it: the groups share the requests)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    default="bfloat16" if torch.cuda.is_available() else "float32", help="weights and KV cache dtype")


def add_sampling_args(ap: ArgumentParser, max_new_tokens: int) -> None:
    """The sampling flags (paper §6.1 defaults; vLLM's names): --max-new-tokens, --temperature,
    --top-p, --top-k, --min-p. Read them back with `sampling_params`."""
    ap.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help="response tokens per sequence")
    ap.add_argument("--temperature", type=temperature, default=0.6, help="0 = greedy")
    ap.add_argument("--top-p", type=probability, default=0.95, help="nucleus mass kept")
    ap.add_argument("--top-k", type=nonnegative_int, default=20, help="candidates kept (0 = all)")
    ap.add_argument("--min-p", type=unit_interval, default=0.0, help="drop tokens below min-p x the top probability")


def engine_config(ap: ArgumentParser, args, mode: str = "memento", **overrides):
    """The engine.EngineConfig of add_generation_args' flags (checked there, once), for `mode`;
    ap.error with its one line when the options contradict each other. --kv-cache-gib is
    converted to tokens later, by `kv_cache_budget`, once the model's shape is known. Also
    checks --device."""
    try:
        masking = MementoConfig(args.keep_last_n_blocks, args.mask_delimiters, args.keep_last_block_for_answer)
        config = EngineConfig(masking, mode, sampling_params(args), max_block_tokens=args.max_block_tokens,
                              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              page_size=args.page_size, kv_cache_tokens=args.kv_cache_tokens,
                              unbounded_kv_cache=args.unbounded_kv_cache,
                              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                              async_scheduling=args.async_scheduling, **args.compilation_config, **overrides)
    except ValueError as e:
        ap.error(str(e))
    args.device = check_device(ap, args.device)
    return config


def sampling_params(args, **overrides):
    """sampling.SamplingParams from add_sampling_args' flags (--max-new-tokens is
    max_tokens; --seed is per request, see sampling.request_seed)."""
    kw = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
              max_tokens=args.max_new_tokens)
    kw.update(overrides)
    return SamplingParams(**kw)


def kv_cache_budget(ap: ArgumentParser, args, config, model_config):
    """config with --kv-cache-gib turned into tokens (§A.3.1 bytes per token for this model and
    --dtype); ap.error if that holds no page."""
    if args.kv_cache_gib is None:
        return config
    tokens = int(args.kv_cache_gib * 2**30 // kv_bytes_per_token(model_config, getattr(torch, args.dtype)))
    try:
        return dataclasses.replace(config, kv_cache_tokens=tokens)
    except ValueError as e:
        ap.error(f"--kv-cache-gib {args.kv_cache_gib:g} = {tokens} tokens: {e}")


def load_or_exit(prog: str, checkpoint: str, device: str, dtype: torch.dtype):
    """engine.load, or exit with one line naming the problem (and, for the default checkpoint
    that is not there yet, how to train it)."""
    try:
        if checkpoint == DEFAULT_CHECKPOINT and not Path(checkpoint).is_dir():
            raise FileNotFoundError(f"{checkpoint} does not exist")
        return load(checkpoint, device, dtype)
    except (FileNotFoundError, ValueError, KeyError) as e:
        hint = " (train one with `python train_sft.py --stage 1` then `--stage 2`)" if checkpoint == DEFAULT_CHECKPOINT else ""
        sys.exit(f"{prog}: cannot load --checkpoint: {str(e).strip(chr(34))}{hint}")
