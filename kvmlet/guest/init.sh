#!/bin/sh
# /init of kvmlet's default guest (busybox sh inside the initramfs).
#
# Mounts the pseudo file systems, brings the network up (loopback; DHCP with udhcpc on every
# NIC, unless the kernel configured one itself with ip=...), prints "kvmlet-guest: ready",
# then either
#  - runs the command given base64-encoded as kvmlet.run=... on the kernel command line, prints
#    "kvmlet-exit: STATUS" and resets the machine, or
#  - gives the user a shell on the console (the device of the last console= parameter).
# The kernel does not pass parameters containing a dot to init, so /proc/cmdline is read.

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname kvmlet

export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root TERM="${TERM:-linux}"

# The network: loopback, and a DHCP lease on every NIC (udhcpc tries for 3 s, then keeps trying
# in the background), unless an ip= parameter had the kernel configure it.
ip link set lo up
case " $(cat /proc/cmdline) " in
    *" ip="*) ;;
    *)
        for interface in /sys/class/net/eth*; do
            [ -e "$interface" ] && udhcpc -i "${interface##*/}" -b -t 3 -T 1
        done
        ;;
esac

run_command=""
for parameter in $(cat /proc/cmdline); do
    case "$parameter" in
        kvmlet.run=*) run_command="${parameter#kvmlet.run=}" ;;
    esac
done

echo "kvmlet-guest: ready"

if [ -n "$run_command" ]; then
    command_text="$(echo "$run_command" | base64 -d)"
    cd /root
    sh -c "$command_text"
    echo "kvmlet-exit: $?"
else
    setsid cttyhack sh -l
fi
sync
reboot -f
