"""How a caller asks the default guest to run one command, and how it reads the result.

The default guest's /init (init.sh) looks for `kvmlet.run=BASE64` on the kernel command line.
When present it decodes the shell command, runs it with `sh -c`, prints `kvmlet-exit: STATUS`
on the console and resets the machine. Base64 keeps spaces and quotes out of the command line;
the parameter contains a dot, so the kernel does not hand it to init as an argument.

The console text comes from the guest and is parsed defensively: only a well-formed marker
counts, and the last one wins.
"""

from __future__ import annotations

import base64
import re

READY_MARKER = "kvmlet-guest: ready"
RUN_PARAMETER = "kvmlet.run"
EXIT_PREFIX = "kvmlet-exit: "
_EXIT_MARKER = re.compile(EXIT_PREFIX.encode() + rb"(\d{1,3})\r?\n")
# x86 COMMAND_LINE_SIZE is 2048 bytes, shared with the monitor's own parameters.
MAX_ENCODED_COMMAND = 1536


def run_parameter(command: str) -> str:
    """The kernel parameter that makes the default guest run `command` (a shell line) and stop."""
    encoded = base64.b64encode(command.encode()).decode("ascii")
    if len(encoded) > MAX_ENCODED_COMMAND:
        raise ValueError(
            f"command too long for the kernel command line ({len(encoded)} > "
            f"{MAX_ENCODED_COMMAND} bytes once encoded)"
        )
    return f"{RUN_PARAMETER}={encoded}"


def parse_exit_status(console_output: bytes) -> int | None:
    """The exit status the guest reported on its console, or None if it reported none."""
    matches = _EXIT_MARKER.findall(console_output)
    if not matches:
        return None
    status = int(matches[-1])
    return status if status <= 255 else None


def command_started(console_output: bytes) -> bool:
    """Whether the guest's init got as far as running the command (it printed the marker)."""
    return (READY_MARKER + "\n").encode() in console_output.replace(b"\r\n", b"\n")


def command_output(console_output: bytes) -> str:
    """The command's own output: what the console showed between the ready marker and the
    last exit marker, with the terminal's CR LF turned back into LF."""
    text = console_output.decode(errors="replace").replace("\r\n", "\n")
    start = text.find(READY_MARKER + "\n")
    if start < 0:
        return ""
    body = text[start + len(READY_MARKER) + 1 :]
    end = body.rfind(EXIT_PREFIX)
    return body if end < 0 else body[:end]
