"""The virtual machine's state held by KVM: vCPU set-up and run loop, interrupts, memory slots and
ioeventfds mirrored from the bus, and the host profile."""
