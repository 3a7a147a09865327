"""``w2v2``'s command line with one injected fault, for the torchrun tests (tests/test_shard.py).

torchrun runs it as a script: ``python -m torch.distributed.run ... tests/torchrun_faults.py transcribe ...``.
Every output an input gets is logged to ``$W2V2_TEST_WRITES`` as ``attempt<TAB>rank<TAB>name``, and on
torchrun's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), right after writing its first output,
rank ``$W2V2_TEST_KILL_RANK`` kills itself with SIGKILL (nothing runs after it: no clean-up, no
message) or rank ``$W2V2_TEST_HANG_RANK`` stops answering (sleeps). The code under test is the
real one: only ``write_outputs`` is wrapped.
"""

import os
import signal
import sys
import time

from w2v2.cli import main
from w2v2.commands import _shared

_write_outputs = _shared.write_outputs


def _rank_is(variable: str) -> bool:
    return os.environ.get(variable) == os.environ["RANK"] and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"


def write_outputs(result, output_dir, name, formats):
    paths = _write_outputs(result, output_dir, name, formats)
    with open(os.environ["W2V2_TEST_WRITES"], "a") as log:  # one short append: whole lines from every rank
        log.write(f"{os.environ.get('TORCHELASTIC_RESTART_COUNT')}\t{os.environ['RANK']}\t{name}\n")
    if _rank_is("W2V2_TEST_KILL_RANK"):
        os.kill(os.getpid(), signal.SIGKILL)
    if _rank_is("W2V2_TEST_HANG_RANK"):
        time.sleep(3600)
    return paths


_shared.write_outputs = write_outputs

if __name__ == "__main__":
    sys.exit(main())
