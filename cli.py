"""Command-line plumbing shared by the scripts: one-line errors and checked argument types.

A bad argument ends the program with exactly one line on stderr naming the argument, what
was wrong and what to pass; never a traceback, never a silent substitute. Defaults are shown
in --help.
"""
from __future__ import annotations

import argparse
import sys


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
        if (low is not None and (x < low or (low_open and x == low))) or (high is not None and (x > high or (high_open and x == high))):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return x
    parse.__name__ = what or kind.__name__
    return parse


positive_int = _number(int, 1, what="use an integer >= 1")
nonnegative_int = _number(int, 0, what="use an integer >= 0")
positive_float = _number(float, 0.0, low_open=True, what="use a number > 0")
fraction = _number(float, 0.0, 1.0, high_open=True, what="use a number in [0, 1)")


def check_device(ap: ArgumentParser, device: str) -> str:
    """'cpu', 'cuda' or 'cuda:N' that exists here; otherwise ap.error (one line, exit 2)."""
    import torch

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
