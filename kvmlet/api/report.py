"""What the control commands print for a person: the machine table, statistics, the balloon."""

from __future__ import annotations

from kvmlet.api.client import BalloonInfo, MachineInfo, Stats

MiB = 1 << 20
TABLE_COLUMNS = ("NAME", "PID", "STATE", "VCPUS", "MEMORY", "UPTIME")


def size_text(size: int) -> str:
    """Bytes as a person reads them: 256M, 1.5G, 4K, 0."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return str(size)


def duration_text(seconds: float) -> str:
    """12s, 3m12s, 2h05m, 3d04h."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def machine_table(machines: list[MachineInfo]) -> str:
    rows = [TABLE_COLUMNS] + [
        (
            info.name,
            str(info.pid),
            info.state,
            str(info.vcpus),
            size_text(info.memory_bytes),
            duration_text(info.uptime_seconds),
        )
        for info in machines
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(TABLE_COLUMNS))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in rows
    )


def balloon_text(balloon: BalloonInfo) -> str:
    lines = [
        f"balloon: target {size_text(balloon.target_bytes)}, "
        f"guest reports {size_text(balloon.actual_bytes)}, "
        f"released {size_text(balloon.inflated_bytes)} "
        f"(+{size_text(balloon.reported_bytes)} free pages reported), "
        f"of {size_text(balloon.guest_memory_bytes)}"
    ]
    figures = balloon.statistics
    if figures:
        memory = ", ".join(
            f"{label} {size_text(figures[key])}"
            for key, label in (
                ("total_memory", "total"),
                ("free_memory", "free"),
                ("available_memory", "available"),
                ("disk_caches", "caches"),
            )
            if key in figures
        )
        faults = f"{figures.get('major_faults', 0)} major / {figures.get('minor_faults', 0)} minor"
        age = balloon.statistics_age_seconds
        when = "" if age is None else f" ({age:.1f} s ago)"
        lines.append(f"guest memory{when}: {memory}; page faults {faults}")
    return "\n".join(lines) + "\n"


def stats_text(info: MachineInfo, stats: Stats, previous: Stats | None, interval: float) -> str:
    """A screenful of statistics; with `previous` (taken `interval` seconds earlier) the
    exit columns are rates per second."""
    header = (
        f"{info.name} (pid {info.pid}) {info.state}, {info.vcpus} vCPU"
        f"{'s' if info.vcpus != 1 else ''}, {size_text(info.memory_bytes)}, "
        f"up {duration_text(info.uptime_seconds)}"
    )
    lines = [header, ""]
    reasons = ["io", "mmio", "intr"]
    rare = sorted(
        {reason for vcpu in stats.vcpus for reason, count in vcpu.exits.items() if count}
        - set(reasons)
    )
    unit = "exits/s" if previous is not None else "exits"
    lines.append(f"{'vCPU':<6}" + "".join(f"{name:>12}" for name in reasons + rare) + f"  ({unit})")
    for index, vcpu in enumerate(stats.vcpus):
        values = []
        for reason in reasons + rare:
            count = vcpu.exits.get(reason, 0)
            if previous is not None and interval > 0:
                count = (count - previous.vcpus[index].exits.get(reason, 0)) / interval
            values.append(f"{count:>12,.0f}")
        lines.append(f"{vcpu.id:<6}" + "".join(values))
    memory = stats.memory
    lines.append("")
    lines.append(
        f"memory: monitor {size_text(memory['monitor_rss_bytes'])}, guest RAM resident "
        f"{size_text(memory['guest_ram_rss_bytes'])} of {size_text(info.memory_bytes)}, "
        f"{memory['threads']} threads"
    )
    lines.extend(_region_lines(stats))
    lines.extend(_queue_lines(stats))
    text = "\n".join(lines) + "\n"
    if stats.balloon is not None:
        text += balloon_text(stats.balloon)
    return text


def _region_lines(stats: Stats, count: int = 5) -> list[str]:
    """The busiest I/O regions (reads + writes) of both address spaces."""
    regions = []
    for space in ("port_io", "mmio"):
        for name, counters in stats.raw.get(space, {}).get("regions", {}).items():
            regions.append((counters["reads"] + counters["writes"], space, name, counters))
    if not regions:
        return []
    lines = ["busiest I/O regions:"]
    for _, space, name, counters in sorted(regions, reverse=True)[:count]:
        lines.append(
            f"  {name:<22} {space:<8} {counters['reads']:>12,} reads {counters['writes']:>12,} "
            "writes"
        )
    return lines


def _queue_lines(stats: Stats) -> list[str]:
    lines = []
    for name, device in stats.raw.get("virtio", {}).items():
        if not isinstance(device, dict) or "queues" not in device:
            continue
        for index, queue in enumerate(device["queues"]):
            if queue["notifications"] or queue["requests"]:
                lines.append(
                    f"  {name} queue {index}: {queue['requests']:,} requests, "
                    f"{queue['notifications']:,} notifications, {queue['interrupts']:,} "
                    f"interrupts, {size_text(queue['bytes_from_guest'])} in, "
                    f"{size_text(queue['bytes_to_guest'])} out"
                )
    return ["virtio queues:", *lines] if lines else []
