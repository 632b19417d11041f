"""The I/O bus: a region tree rendered into a flat, sorted dispatch table; PCI."""
