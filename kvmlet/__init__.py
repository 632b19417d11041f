"""kvmlet: a lightweight Linux KVM virtual machine monitor in pure Python."""

__version__ = "0.1.0"
