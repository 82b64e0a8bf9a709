"""The scheduler: which sequences run in the next step, with how many tokens (paper §6.1 serving).

Pure policy over sequences and page counts, as in vLLM V1 and nano-vLLM: no torch, no model.
Everything it needs to know or do to a sequence goes through a `Host` (the engine), which owns
the mechanism: reading a chunk's tokens with the block tracker (and evicting what they mask),
counting pages, freeing them.

    sched = Scheduler(max_num_seqs=256, max_num_batched_tokens=2048, watermark_pages=1, host=engine)
    sched.add(seq)                        # waits, by its footprint
    rows = sched.schedule()               # [(seq, first position, tokens)], pages reserved by the host

The order, each step (vLLM V1):
  1. Running sequences, oldest first. Each gets its work (one token when decoding, a chunk of
     its prefill otherwise) while leaving one token of the step's budget for every later one.
     When the pool is short, the most recently admitted sequence is preempted (its pages
     freed, first in line again); a sequence alone in the pool that still cannot grow has
     outgrown it and ends.
  2. Admissions, first come first served, while a sequence's footprint (the most pages its
     prefill will hold: its compacted peak, not its length, paper §6.1) plus a watermark
     fits what is free.

`run_ahead` is the rule of asynchronous scheduling: the next step may be planned while the
device still computes this one only if that plan cannot depend on the tokens it is computing.
"""
from __future__ import annotations

from collections import deque
from typing import Protocol


class Host(Protocol):
    """What the scheduler asks of the engine (paper §6.1): its mechanism, by sequence."""

    def plan(self, s, limit: int) -> tuple[int, int]:
        """The chunk s feeds next, at most `limit` tokens, as (first position, tokens); reads
        its tokens (evicting what they mask). Raises for a sequence that cannot be planned."""

    def pages_to_append(self, s, n: int) -> int:
        """New pages s needs to hold n more tokens."""

    def free_pages(self) -> int:
        """Pages free in the pool now."""

    def start(self, s) -> None:
        """An admitted sequence gets its (empty) cache entry."""

    def preempt(self, s) -> bool:
        """Free s's pages and size its footprint again; False if it can never fit (ended)."""

    def outgrown(self, s) -> None:
        """End s, alone in the pool and still short of pages."""

    def reject(self, s, reason: str) -> None:
        """End a waiting s that can never be admitted."""

    def fail(self, s, e: BaseException) -> None:
        """End s after an exception while handling it (the others go on)."""

    def ahead(self, s) -> bool | None:
        """Run-ahead: True if s's next step is one token fed from the device (its token in
        flight), decided without knowing that token; None if that token is its last (it ends
        when it arrives: no row); False if s needs the token first."""


class Scheduler:
    """vLLM V1's scheduling over a paged pool (paper §6.1): running first, then admissions.

    Args:
        max_num_seqs: sequences running at once; max_num_batched_tokens: tokens per step,
            decode and prefill together; watermark_pages: pages kept free when admitting
            while others run (so running sequences can grow); host: the engine (Host).
    Sequences are the engine's; the scheduler reads only `footprint` (pages its prefill
    will hold at most). `waiting` (a deque) and `running` (a list, admission order) are
    read by the engine. Raises nothing itself; a host call that raises for one sequence
    ends that sequence (host.fail), never the step.
    """

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, watermark_pages: int, host: Host):
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.watermark_pages, self.host = watermark_pages, host
        self.waiting: deque = deque()
        self.running: list = []
        self.preemptions = 0

    def add(self, s, front: bool = False) -> None:
        """Queue s: last (a new request), or first (a preempted one goes back before the rest)."""
        if front:
            self.waiting.appendleft(s)
        else:
            self.waiting.append(s)

    def remove(self, s) -> None:
        """Forget s (finished or aborted), waiting or running."""
        if s in self.running:
            self.running.remove(s)
        elif s in self.waiting:
            self.waiting.remove(s)

    def schedule(self) -> list[tuple]:
        """This step's rows (sequence, first position, tokens), pages reserved by the host's
        plan: running sequences first, oldest first, each leaving one token of the budget for
        every later one; a short pool preempts the newest. Then admissions with what is left."""
        host = self.host
        budget, promised, rows = self.max_num_batched_tokens, 0, []
        i = 0
        while i < len(self.running):
            s = self.running[i]
            try:
                start, n = host.plan(s, budget - (len(self.running) - i - 1))
                need = host.pages_to_append(s, n)
            except Exception as e:  # noqa: BLE001 -- s alone ends; running[i] is the next one now
                self._fail(s, e)
                continue
            while need > host.free_pages() - promised and self.running[-1] is not s:
                self._preempt(self.running[-1])
            if need > host.free_pages() - promised:
                self.running.remove(s)
                if i == 0:  # alone in the pool and still short: it can never grow here
                    self._guard(host.outgrown, s)
                else:
                    self._preempt(s, running=False)
                continue
            rows.append((s, start, n))
            promised += need
            budget -= n
            i += 1
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            s = self.waiting[0]
            free = host.free_pages() - promised
            if s.footprint + (self.watermark_pages if self.running else 0) > free:
                if not self.running and not rows:  # nothing will give pages back (only with keep_cache)
                    self.waiting.popleft()
                    self._guard(host.reject, s, f"KV pool full: {s.footprint} pages needed, {free} free")
                    continue
                break
            self.waiting.popleft()
            try:
                host.start(s)
                start, n = host.plan(s, budget)
                promised += host.pages_to_append(s, n)
            except Exception as e:  # noqa: BLE001 -- see _fail
                self._fail(s, e)
                continue
            rows.append((s, start, n))
            budget -= n
            self.running.append(s)
        return rows

    def run_ahead(self) -> list[tuple] | None:
        """The next step's rows planned before the tokens now on the device are known, or None
        when that plan could differ from what `schedule` will choose once they are (paper §6.1,
        asynchronous scheduling). It may not differ when: nothing waits (no admission could
        take a slot those tokens free), every running sequence's next step is one token fed
        from the device (host.ahead), and the pool holds every row's next token even if none of
        them ends (so no preemption either way). Rows whose token in flight is their last are
        left out, as `schedule` would no longer see them. Rows are (sequence, None, 1): the
        position is the one after the token in flight."""
        if self.waiting:
            return None
        rows = []
        for s in self.running:
            ok = self.host.ahead(s)
            if ok is False:
                return None
            if ok:
                rows.append(s)
        if sum(self.host.pages_to_append(s, 1) for s in rows) > self.host.free_pages():
            return None
        return [(s, None, 1) for s in rows]

    def _preempt(self, s, running: bool = True) -> None:
        if running:
            self.running.remove(s)
        self.preemptions += 1
        if self._guard(self.host.preempt, s):
            self.waiting.appendleft(s)

    def _fail(self, s, e: BaseException) -> None:
        self.remove(s)
        self.host.fail(s, e)

    def _guard(self, fn, s, *args):
        """Call a host hook for one sequence; an exception ends that sequence alone."""
        try:
            return fn(s, *args)
        except Exception as e:  # noqa: BLE001 -- see _fail
            self._fail(s, e)
            return None
