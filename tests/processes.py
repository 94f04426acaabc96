"""Child processes that cannot hang the suite: each runs in its own process group, and past its
timeout the whole group (Lightning's DDP relaunches ranks as grandchildren) gets SIGKILL, since
Lightning swallows SIGTERM. A hang then fails its test instead of stalling CI."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from typing import Sequence

import pytest


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_killable(cmd: Sequence[str], timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` with a SIGKILL of the process group at ``timeout``."""
    return run_all_killable([cmd], timeout, [popen_kwargs])[0]


def run_all_killable(
    cmds: Sequence[Sequence[str]], timeout: float, popen_kwargs: Sequence[dict]
) -> list[subprocess.CompletedProcess]:
    """Start every command at once (e.g. one per "node"), wait for all within ``timeout`` seconds in total.

    Output goes to temporary files, not pipes: a pipe read after another process's would fill up and
    block a chatty process (and with it the collective the others wait in).
    """
    outputs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in cmds]
    procs = [
        subprocess.Popen(list(cmd), stdout=out, stderr=err, text=True, start_new_session=True, **kw)
        for cmd, kw, (out, err) in zip(cmds, popen_kwargs, outputs)
    ]
    deadline = time.monotonic() + timeout
    try:
        timed_out = None
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = proc
                break
        if timed_out is not None:
            for p in procs:
                _kill_group(p)
            for p in procs:
                p.wait()
        done = []
        for proc, (out, err) in zip(procs, outputs):
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
        if timed_out is not None:
            late = done[procs.index(timed_out)]
            pytest.fail(
                f"{' '.join(map(str, timed_out.args))} did not finish within {timeout:.0f} s and was killed (SIGKILL): "
                f"a hang?\n--- stdout\n{late.stdout[-3000:]}\n--- stderr\n{late.stderr[-6000:]}"
            )
    finally:
        for p in procs:  # ranks left behind by a failed parent
            _kill_group(p)
        for out, err in outputs:
            out.close()
            err.close()
    return done


def spawn_killable(fn, args: tuple, nprocs: int, timeout: float) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` whose processes get SIGKILL past ``timeout`` seconds."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    os.kill(process.pid, signal.SIGKILL)
            pytest.fail(f"spawned processes of {fn.__name__} did not finish within {timeout:.0f} s and were killed")
