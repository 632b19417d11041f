"""A watchdog timer at a port range: the guest sets TIMEOUT_MS and ENABLE; unless it writes
KICK (any value) within the timeout, the device sets EXPIRED, counts the expiry and raises its
interrupt until the guest clears EXPIRED.

The waiting happens on a worker thread (`worker.sleep`, which a closing machine interrupts);
the wait's deadline is handed to the job (a job never reads registers), and the completion,
under the device lock, looks again: a kick since then means waiting for the new deadline. Time
comes from `context.clock()`, so a recording replays (without the waiting).

    kvmlet run ... --device examples/watchdog.py:Watchdog,port=0x510,irq=11,timeout_ms=500
"""

from kvmlet.devices import Register, RegisterDevice

ENABLE = 1  # control
EXPIRED = 1  # status


class Watchdog(RegisterDevice):
    def __init__(self, context, timeout_ms="1000"):
        super().__init__(context, 0x10, [
            Register("control", 0x0, on_write=self.kick),
            Register("timeout_ms", 0x4, value=int(timeout_ms, 0), on_write=self.kick),
            Register("kick", 0x8, on_write=self.kick),
            Register("status", 0xC, width=2, read_only=True, w1c=EXPIRED, on_write=self.irq),
            Register("expiries", 0xE, width=2, read_only=True),
        ])  # fmt: skip
        self.worker = context.worker()
        self.deadline = None
        self.waiting = False

    def kick(self, _value=0):
        """Any write to CONTROL, TIMEOUT_MS or KICK restarts the countdown."""
        if not self["control"] & ENABLE:
            self.deadline = None
            return
        self.deadline = self.context.clock() + self["timeout_ms"] / 1000
        self.wait_for(self.deadline)

    def wait_for(self, deadline):
        if not self.waiting:
            self.waiting = True
            self.worker.submit(lambda: self.sleep_until(deadline), self.check)

    def sleep_until(self, deadline):
        """On the worker thread: sleep until `deadline` (monotonic seconds)."""
        while (remaining := deadline - self.context.clock()) > 0:
            self.worker.sleep(remaining)

    def check(self, _result):
        """Under the device lock: expire, unless a kick moved the deadline meanwhile."""
        self.waiting = False
        if self.deadline is None:
            return
        if self.context.clock() < self.deadline:
            self.wait_for(self.deadline)
            return
        self.deadline = None
        self.set_bits("status", EXPIRED)
        self["expiries"] += 1
        self.irq()

    def irq(self, _value=None):
        if self.context.irq is not None:
            self.context.irq.set_level(bool(self["status"] & EXPIRED))
