"""The code blocks of a Markdown page, as the docs' tests run them.

A block's info string is its language, then `file=NAME` (written to that file), `run` (a
Python script run as it is) or `status=N` (shell commands, run with bash, that must end with
exit status N)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

_BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)


class Snippet(NamedTuple):
    language: str
    options: dict[str, str]
    code: str


def snippets(page: Path) -> list[Snippet]:
    found = []
    for language, info, code in _BLOCK.findall(page.read_text()):
        options = {}
        for word in info.split():
            key, _, value = word.partition("=")
            options[key] = value
        found.append(Snippet(language, options, code))
    return found
