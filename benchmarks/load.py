"""A busy process on one core, for timing beside a neighbour (``--busy-core``, suite ``cpu-load``).

A CPU kernel whose threads wait for each other every step stalls when one of its threads shares a
core with someone else; nn.LSTM's OpenMP loops do too. ``BusyCore`` starts a Python spin loop
(``while True: pass``), pins it to one core with ``os.sched_setaffinity`` and stops it again
(terminate, then kill). The benchmark's own affinity is left alone: its threads meet the busy one
the way they would meet any neighbour. The child also asks the kernel to kill it when its parent
dies (Linux ``PR_SET_PDEATHSIG``), so even a benchmark killed outright leaves no spinner behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

# Exits when the parent is gone (prctl(PR_SET_PDEATHSIG=1, SIGKILL)), then spins.
_SPIN = (
    "import os, signal, sys\n"
    "parent = int(sys.argv[1])\n"
    "try:\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != parent:\n"
    "    sys.exit(0)\n"
    "while True:\n"
    "    pass\n"
)


def last_core() -> int:
    """The highest-numbered core this process may run on."""
    try:
        return max(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return (os.cpu_count() or 1) - 1


class BusyCore:
    """``with BusyCore(core) as b: ...`` or ``b = BusyCore(core).start(); ...; b.stop()``."""

    def __init__(self, core: Optional[int] = None):
        self.core = last_core() if core is None else int(core)
        allowed = _allowed_cores()
        if allowed is not None and self.core not in allowed:
            raise ValueError(f"--busy-core {self.core}: not one of this process's cores "
                             f"{sorted(allowed)}")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> "BusyCore":
        self.proc = subprocess.Popen([sys.executable, "-c", _SPIN, str(os.getpid())],
                                     stdin=subprocess.DEVNULL)
        try:
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(self.proc.pid, {self.core})
        except BaseException:
            self.stop()
            raise
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the spinner (kill it if it lingers) and reap it; safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "BusyCore":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _allowed_cores():
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
