"""virtio-net: the device with its Python data path, its backends and the `-n` option."""
