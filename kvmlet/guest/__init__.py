"""kvmlet's default guest: a minimal kernel and a busybox initramfs, built and cached."""
