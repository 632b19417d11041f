#!/bin/sh
# PID 1 of the test box's L1 guest (run by the host's /bin/sh, read through the 9p root).
#
# The root file system is the host's own, shared read-only over 9p. This script gives L1 the
# writable places a test run needs (tmpfs), mounts the session share (tag kvmletbox: the command
# to run, its environment, and where the exit status goes) and the project checkout read-write
# at its host path (tag kvmletwork), runs the command with the console as its terminal, writes
# the exit status, and resets the machine (QEMU runs with -no-reboot, so it exits).
# The host's /sbin/reboot is systemd's; busybox-static's reboot works without it.

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
for writable in /dev/shm /tmp /run /var/tmp; do
    mount -t tmpfs tmpfs "$writable"
done

options=trans=virtio,version=9p2000.L,msize=262144
session=/run/kvmlet-box
mkdir -p "$session"
mount -t 9p -o "$options" kvmletbox "$session"
# The checkout may live under a path the tmpfs mounts above just hid (CI clones into /tmp):
# make its mount point on the fresh tmpfs.
work_dir="$(cat "$session/work_dir")"
mkdir -p "$work_dir"
mount -t 9p -o "$options,cache=mmap" kvmletwork "$work_dir"

# Only emergencies (panics) from L1's kernel interleave with the command's output from now on;
# `dmesg` inside the box shows the rest.
echo 1 > /proc/sys/kernel/printk
stty -onlcr 2>/dev/null
token="$(cat "$session/token")"
echo "kvmlet-box: start $token"
(. "$session/environment" && . "$session/command")
status=$?
echo "$status" > "$session/status"
echo "kvmlet-box: end $token"
sync
/bin/busybox reboot -f
