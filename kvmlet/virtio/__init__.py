"""virtio: split virtqueues, PCI and MMIO transports, one module per device."""
