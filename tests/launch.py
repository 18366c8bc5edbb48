"""Two-process runs for the tests: `torchrun --standalone --nproc_per_node 2` (`accelerate launch --cpu
--num_processes 2` silently runs one process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `args` (a script and its arguments, or "-m", "captune", ...) in two processes; fail with their stderr if
    it exits non-zero or runs past `timeout`. On a timeout the whole process group is killed: killing torchrun alone
    left its workers running, orphaned, for the rest of the suite."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"torchrun ran past {timeout} s: {stderr[-3000:]}") from None
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert done.returncode == 0, stderr[-3000:]
    return done
