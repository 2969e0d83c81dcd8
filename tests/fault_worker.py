"""What tests/test_runtime_faults.py launches for a kill during a checkpoint write: ``sdec ARGS``
with one test hook set from the environment (nothing of this is in the runtime itself):

- SDEC_TEST_STALL_AT=N: the N-th checkpoint write (1-based) writes the first half of the
  checkpoint's bytes to its temporary file, fsyncs it, creates ``<tmp>.stalled`` and then
  waits forever, so the test can kill -9 the process while a half-written file exists.
"""
import io
import os
import sys
import time

import torch

from sdec.cli import main
from sdec.runtime import checkpoint

STALL_AT = int(os.environ.get("SDEC_TEST_STALL_AT", "0"))
_real_save = checkpoint.save
_calls = [0]


def stalling_save(state, path):
    _calls[0] += 1
    if _calls[0] != STALL_AT:
        return _real_save(state, path)
    buffer = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, **state}, buffer)
    data = buffer.getvalue()
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    open(tmp + ".stalled", "w").close()
    while True:
        time.sleep(1)


checkpoint.save = stalling_save
sys.exit(main(sys.argv[1:]))
