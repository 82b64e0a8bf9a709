"""The scheduler alone (scheduler.py, paper §6.1 serving): pure policy over sequences and page
counts, checked without torch and without a model. A fake host counts pages the way the paged
cache does (ceil(tokens / page size) per sequence) and feeds whole prompts in chunks; the
expected schedules are worked out by hand from vLLM V1's rules."""
import math
import subprocess
import sys

import pytest
from conftest import REPO

from scheduler import Scheduler


class Seq:
    def __init__(self, name, prompt, footprint=None, decode=0):
        self.name, self.prompt, self.decode = name, prompt, decode
        self.held, self.fed, self.footprint = 0, 0, footprint
        self.inflight = False


class FakeHost:
    """Pages of PAGE tokens; a sequence first feeds its prompt in chunks, then one token per
    step. `ended` records (name, why)."""

    PAGE = 4

    def __init__(self, pages):
        self.pages, self.ended, self.log = pages, [], []
        self.seqs = []

    def _pages(self, tokens):
        return math.ceil(tokens / self.PAGE)

    def held_pages(self):
        return sum(self._pages(s.held) for s in self.seqs)

    def plan(self, s, limit):
        left = max(0, s.prompt - s.fed)
        n = min(limit, left) if left else 1
        return s.fed, n

    def pages_to_append(self, s, n):
        return self._pages(s.held + n) - self._pages(s.held)

    def free_pages(self):
        return self.pages - self.held_pages()

    def start(self, s):
        self.seqs.append(s)
        self.log.append(("admit", s.name))

    def preempt(self, s):
        self.seqs.remove(s)
        s.held = s.fed = 0
        self.log.append(("preempt", s.name))
        return True

    def outgrown(self, s):
        self.seqs.remove(s)
        self.ended.append((s.name, "outgrown"))

    def reject(self, s, reason):
        self.ended.append((s.name, reason))

    def fail(self, s, e):
        if s in self.seqs:
            self.seqs.remove(s)
        self.ended.append((s.name, f"error: {e}"))

    def ahead(self, s):
        return s.inflight

    def feed(self, rows):  # what the engine does with a step's rows
        for s, a, n in rows:
            s.held += n
            s.fed = a + n


def sched(host, max_num_seqs=8, budget=16, watermark=1):
    return Scheduler(max_num_seqs, budget, watermark, host)


def names(rows):
    return [(s.name, a, n) for s, a, n in rows]


def test_imports_no_torch():
    """The scheduler is pure policy: importing it loads neither torch nor numpy."""
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import scheduler; " \
           "print(sorted(m for m in ('torch', 'numpy', 'triton') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_running_first_then_admissions_within_the_token_budget():
    host = FakeHost(pages=100)
    s = sched(host, budget=10)
    a, b, c = Seq("a", 6, footprint=2), Seq("b", 20, footprint=6), Seq("c", 3, footprint=1)
    for x in (a, b, c):
        s.add(x)
    rows = s.schedule()  # a's whole prompt (6), then b gets what is left (4); c waits
    assert names(rows) == [("a", 0, 6), ("b", 0, 4)]
    host.feed(rows)
    rows = s.schedule()  # a decodes (1), b leaves room for nobody after it: 9; c's 3 don't fit
    assert names(rows) == [("a", 6, 1), ("b", 4, 9)]
    host.feed(rows)
    rows = s.schedule()  # a 1, b's last 7, then c is admitted with the 2 left
    assert names(rows) == [("a", 7, 1), ("b", 13, 7), ("c", 0, 2)]
    assert [x.name for x in s.running] == ["a", "b", "c"] and not s.waiting


def test_each_running_sequence_leaves_a_token_for_every_later_one():
    host = FakeHost(pages=100)
    s = sched(host, budget=5)
    seqs = [Seq(n, 20, footprint=5) for n in "xyz"]
    for x in seqs:  # three sequences mid-prompt, running in this order
        x.fed = x.held = 4
        host.seqs.append(x)
        s.running.append(x)
    # x may take 5 - 2 (one for y, one for z), y what is left but one for z, z the last
    assert names(s.schedule()) == [("x", 4, 3), ("y", 4, 1), ("z", 4, 1)]


def test_a_short_pool_preempts_the_newest_and_it_waits_first_in_line():
    host = FakeHost(pages=4)  # 16 tokens
    s = sched(host, budget=16, watermark=0)
    a, b = Seq("a", 7, footprint=2), Seq("b", 7, footprint=2)
    s.add(a)
    s.add(b)
    host.feed(s.schedule())  # both prefilled: 2 pages each, pool full
    assert host.free_pages() == 0
    a.held, b.held = 8, 8  # both at a page boundary: the next token needs a page each
    rows = s.schedule()
    # a (oldest) needs a page: b (newest) is preempted; a runs; b is first in line, not admitted
    assert names(rows) == [("a", 7, 1)] and [x.name for x in s.waiting] == ["b"]
    assert ("preempt", "b") in host.log and s.preemptions == 1


def test_alone_and_still_short_it_has_outgrown_the_pool():
    host = FakeHost(pages=2)
    s = sched(host, watermark=0)
    a = Seq("a", 8, footprint=2)
    s.add(a)
    host.feed(s.schedule())
    assert s.schedule() == [] and host.ended == [("a", "outgrown")] and not s.running


def test_admission_by_footprint_and_watermark():
    host = FakeHost(pages=10)
    s = sched(host, budget=64, watermark=2)
    a = Seq("a", 4, footprint=1)
    b = Seq("b", 40, footprint=8)  # its prefill would hold 8 pages at most (a compacted peak)
    s.add(a)
    s.add(b)
    rows = s.schedule()
    # a admitted (nothing running: no watermark); b's 8 + watermark 2 > 9 free: it waits
    assert names(rows) == [("a", 0, 4)] and [x.name for x in s.waiting] == ["b"]
    b.footprint = 6  # 6 + 2 <= 10 - 1 held - 1 promised to a's next token
    host.feed(rows)
    rows = s.schedule()
    assert [r[0].name for r in rows] == ["a", "b"]


def test_a_request_that_never_fits_an_empty_pool_is_rejected():
    host = FakeHost(pages=3)
    s = sched(host)
    s.add(Seq("big", 40, footprint=5))
    assert s.schedule() == [] and host.ended[0][0] == "big" and "5 pages needed" in host.ended[0][1]


def test_a_host_error_ends_that_sequence_alone():
    host = FakeHost(pages=100)
    s = sched(host)
    a, b = Seq("a", 4, footprint=1), Seq("b", 4, footprint=1)
    s.add(a)
    s.add(b)
    real = host.plan
    host.plan = lambda x, limit: (_ for _ in ()).throw(RuntimeError("boom")) if x is a else real(x, limit)
    rows = s.schedule()
    assert names(rows) == [("b", 0, 4)] and host.ended == [("a", "error: boom")] and s.running == [b]


@pytest.mark.parametrize("case", ["waiting", "not ahead", "pages", "ok", "last token"])
def test_run_ahead_only_when_the_plan_cannot_depend_on_tokens_in_flight(case):
    host = FakeHost(pages=3)
    s = sched(host, watermark=0)
    a, b = Seq("a", 3, footprint=1), Seq("b", 3, footprint=1)
    s.add(a)
    s.add(b)
    host.feed(s.schedule())
    a.inflight = b.inflight = True
    if case == "waiting":
        s.add(Seq("c", 2, footprint=1))
        assert s.run_ahead() is None
    elif case == "not ahead":
        b.inflight = False  # b needs its token first (a replay, restart mode, a forced block end)
        assert s.run_ahead() is None
    elif case == "pages":
        a.held = b.held = 4  # each needs a new page for its next token, one is free: a preemption is possible
        assert host.free_pages() == 1 and s.run_ahead() is None
    elif case == "ok":
        assert names(s.run_ahead()) == [("a", None, 1), ("b", None, 1)]
    else:
        b.inflight = None  # its token in flight is its last: no row
        assert names(s.run_ahead()) == [("a", None, 1)]
