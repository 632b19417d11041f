"""Typed ioctl layer over /dev/kvm: Kvm -> Vm -> Vcpu, exits as typed values."""
