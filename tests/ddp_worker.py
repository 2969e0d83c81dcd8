"""What tests/test_runtime_ddp.py launches under torchrun: ``sdec ARGS`` in one rank, with two
test hooks set from the environment (nothing of this is in the runtime itself):

- SDEC_TEST_DUMP=DIR: after the last step, every rank saves its network and process weights
  (the training module's state dict) to DIR/rank-R.pt, so the test can compare the ranks;
- SDEC_TEST_NAN=R:S: from step S on (0-based), rank R's network answers NaN;
- SDEC_TEST_ATEXIT=DIR: an atexit handler writes DIR/atexit-rank-R, which exists afterwards
  only if the rank went through interpreter finalization (sdec.runtime.distributed.leave
  skips it: the race it avoids is described there).
"""
import atexit
import os
import sys

import torch

from sdec.cli import main
from sdec.runtime import train as train_mod

RANK = int(os.environ.get("RANK", "0"))


def dump_then(finish, where):
    def wrapped(run, echo):
        os.makedirs(where, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
        torch.save(state, os.path.join(where, f"rank-{RANK}.pt"))
        return finish(run, echo)
    return wrapped


def poison(train_step, rank, at):
    def wrapped(run, step):
        if RANK == rank and step == at:
            run.net.register_forward_hook(lambda module, args, output: output * float("nan"))
        return train_step(run, step)
    return wrapped


if os.environ.get("SDEC_TEST_DUMP"):
    train_mod.finish = dump_then(train_mod.finish, os.environ["SDEC_TEST_DUMP"])
if os.environ.get("SDEC_TEST_NAN"):
    rank, at = (int(v) for v in os.environ["SDEC_TEST_NAN"].split(":"))
    train_mod.train_step = poison(train_mod.train_step, rank, at)
if os.environ.get("SDEC_TEST_ATEXIT"):
    mark = os.path.join(os.environ["SDEC_TEST_ATEXIT"], f"atexit-rank-{RANK}")
    atexit.register(lambda: open(mark, "w").close())
torch.set_num_threads(1)
sys.exit(main(sys.argv[1:]))
