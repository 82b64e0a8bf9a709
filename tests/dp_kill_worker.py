"""One process of tests/test_data_parallel.py's kill-and-resume check: eval.py under torchrun,
where process 1 dies outright (os._exit, as `kill -9` would: no exception, no flush, nothing
posted) right after appending its second record.

    python -m torch.distributed.run --nproc_per_node 2 tests/dp_kill_worker.py EVAL.PY-FLAGS...

torchrun then ends process 0 wherever it is (decoding, or waiting for process 1 to finish),
leaving --out with process 0's records so far and process 1's part file with two.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval as ev  # noqa: E402

real_run = ev.run


def run(*args, on_record, **kw):
    written = 0

    def record(r, seq):
        nonlocal written
        on_record(r, seq)
        written += 1
        if os.environ["RANK"] == "1" and written == 2:
            os._exit(9)

    return real_run(*args, on_record=record, **kw)


if __name__ == "__main__":
    ev.run = run
    ev.main(sys.argv[1:])
