"""A machine: memory map, boot loaders, device wiring, vCPU threads and the run loop."""
