"""Snapshot files: a paused machine's state and guest RAM, and reading them back.

`format.py` is the file (a checksummed preamble, the RAM banks written sparsely, a JSON state
document with a checksum); `codec.py` how device states (plain dicts that may hold bytes)
become that JSON; `ram.py` writes guest RAM without its zero pages and maps it back
copy-on-write; `registry.py` walks the parts of a machine that save and load their own state.
What goes into the state document is the machine's business (kvmlet/machine/snapshot.py).
"""
