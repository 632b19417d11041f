"""The machine's vCPU threads: one per vCPU, the signal that kicks them out of KVM_RUN, and
waiting for them to leave once the guest stopped.

A kick is a real-time signal whose handler does nothing: delivered to a thread inside
KVM_RUN, it makes the ioctl return, and the run loop then looks at why it should stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmlet.errors import KvmletError

if TYPE_CHECKING:
    from kvmlet.kvm import Vcpu

KICK_SIGNAL = signal.SIGRTMIN + 4
"""Sent to a vCPU thread to make KVM_RUN return (its handler does nothing)."""
KICK_INTERVAL = 0.05
"""Seconds between kicks while waiting for vCPU threads to stop."""
VCPU_STOP_TIMEOUT = 10.0
"""Seconds `wait` and `close` wait for the vCPU threads to leave after a stop."""


def _install_kick_handler() -> None:
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return
    if threading.current_thread() is not threading.main_thread():
        raise KvmletError("create the first kvmlet Machine from the main thread (signal setup)")
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class VcpuThreads:
    """The threads that run a machine's vCPUs (made from the main thread the first time: the
    kick's handler is installed then)."""

    def __init__(self) -> None:
        _install_kick_handler()
        self.threads: list[threading.Thread] = []

    def start(self, vcpus: list[Vcpu], run: Callable[[Vcpu], None]) -> None:
        """One daemon thread per vCPU, running `run(vcpu)`."""
        for vcpu in vcpus:
            thread = threading.Thread(target=run, args=(vcpu,), name=f"vcpu{vcpu.id}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def kick(self) -> None:
        """Signal every other vCPU thread still alive, so a KVM_RUN it sleeps in returns."""
        current = threading.current_thread()
        for thread in self.threads:
            if thread.is_alive() and thread is not current:
                with contextlib.suppress(ProcessLookupError, TypeError):
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)

    def join(self) -> bool:
        """Wait for the vCPU threads to leave, kicking again meanwhile: a kick can land just
        before a thread re-enters KVM_RUN, and a vCPU waiting for INIT/SIPI on some KVMs
        does not look at immediate_exit. False if one still runs after VCPU_STOP_TIMEOUT."""
        deadline = time.monotonic() + VCPU_STOP_TIMEOUT
        while any(thread.is_alive() for thread in self.threads):
            if time.monotonic() >= deadline:
                return False
            self.kick()
            for thread in self.threads:
                thread.join(KICK_INTERVAL)
        return True
