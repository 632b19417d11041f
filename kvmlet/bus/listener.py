"""A listener that records what each rebuild reported (tests, tracing, debugging)."""

from __future__ import annotations

from kvmlet.bus.flat import IoEventNotifier, MemorySection


class RecordingListener:
    """Keeps the current sections and notifiers, and a log of every event in order."""

    def __init__(self) -> None:
        self.sections: set[MemorySection] = set()
        self.notifiers: set[IoEventNotifier] = set()
        self.events: list[tuple[str, MemorySection | IoEventNotifier]] = []

    def region_added(self, section: MemorySection) -> None:
        self.sections.add(section)
        self.events.append(("region_added", section))

    def region_removed(self, section: MemorySection) -> None:
        self.sections.remove(section)
        self.events.append(("region_removed", section))

    def eventfd_added(self, notifier: IoEventNotifier) -> None:
        self.notifiers.add(notifier)
        self.events.append(("eventfd_added", notifier))

    def eventfd_removed(self, notifier: IoEventNotifier) -> None:
        self.notifiers.remove(notifier)
        self.events.append(("eventfd_removed", notifier))
