"""torchrun's process group: joined by Dist, left again before each rank's interpreter exits."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

RANK = """
import atexit
import torch.distributed as dist
# atexit runs last what was registered first: this line reports after Dist's own exit handler has run.
atexit.register(lambda: print("in a process group at exit:", dist.is_initialized(), flush=True))
from embedcache.runtime.distributed import Dist
d = Dist("cpu")
d.barrier()
print("rank", d.rank, "of", d.world, flush=True)
"""


def test_each_rank_leaves_the_process_group_before_it_exits():
    # A rank that left it to the interpreter's exit could abort there ("terminate called without an active
    # exception", seen when the suite ran beside another worker), and torchrun then failed a finished encode.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", RANK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for rank in range(2)]
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
            assert f"rank {rank} of 2" in out
            assert "in a process group at exit: False" in out, out + err[-2000:]
    finally:  # a rank left waiting for its peer (a timeout, a failed assert) does not outlive the test
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
