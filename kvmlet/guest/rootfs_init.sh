#!/bin/sh
# /init of kvmlet's root-file-system initramfs (busybox sh): the guest's root is a host
# directory shared over virtio-9p or virtiofs (kvmlet run --rootfs, kvmlet sandbox).
#
# Stage 1, PID 1 in the initramfs: check that the kernel has what this needs, mount the share
# named by root= as rootfstype= says (9p or virtiofs; read-only under a tmpfs overlay, or
# read-write with kvmlet.rootfs=rw), give it /proc, /sys, /dev, /tmp and /run, copy busybox,
# udhcpc's script and this script to /run/kvmlet and switch_root.
# Stage 2, PID 1 in the new root: bring the network up (loopback; DHCP on every NIC), then run
# the kvmlet.sandbox agent (kvmlet.ctl=TAG names its control share, always 9p), the command of
# kvmlet.run=BASE64 on the console, or a shell.
#
# Anything that stops the boot is one line starting "kvmlet-init: " on the console; kvmlet
# reads it back from there (kvmlet/guest/rootfs.py). The kernel does not pass parameters
# containing a dot to init, so /proc/cmdline is read.

if [ "$1" = stage2 ]; then # busybox's own applets: the root's may be other programs
    bb=/run/kvmlet/busybox
else
    bb=/bin/busybox
fi

fail() {
    echo "kvmlet-init: $*"
    $bb sync
    $bb reboot -f
    exit 1
}

parameter() { # the value of kernel parameter $1 (the last one wins, as in Linux)
    value=""
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1"=*) value="${word#"$1"=}" ;; esac
    done
    echo "$value"
}

missing_kernel_options() { # what this kernel lacks of what the boot uses ($1 the root's mode,
    # $2 its type; 9p is also the sandbox's control share), in the kernel's words
    missing=""
    ninep=""
    [ "$2" = 9p ] || [ -n "$(parameter kvmlet.ctl)" ] && ninep=yes
    if [ -n "$ninep" ]; then
        grep -qw 9p /proc/filesystems || missing="$missing CONFIG_9P_FS"
    fi
    if [ "$2" = virtiofs ]; then
        grep -qw virtiofs /proc/filesystems || missing="$missing CONFIG_VIRTIO_FS"
    fi
    if [ ! -d /sys/bus/virtio ]; then
        missing="$missing CONFIG_VIRTIO"
    elif [ -z "$(ls /sys/bus/virtio/devices)" ]; then
        case "$(cat /proc/cmdline)" in
        *virtio_mmio.device=*) missing="$missing CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES" ;;
        *) missing="$missing CONFIG_VIRTIO_PCI" ;;
        esac
    fi
    if [ -n "$ninep" ]; then
        [ -d /sys/bus/virtio/drivers/9pnet_virtio ] || missing="$missing CONFIG_NET_9P_VIRTIO"
    fi
    grep -qw devtmpfs /proc/filesystems || missing="$missing CONFIG_DEVTMPFS"
    grep -qw tmpfs /proc/filesystems || missing="$missing CONFIG_TMPFS"
    if [ "$1" = overlay ]; then
        grep -qw overlay /proc/filesystems || missing="$missing CONFIG_OVERLAY_FS"
    fi
    echo "$missing"
}

stage1() {
    export PATH=/bin:/sbin:/usr/bin:/usr/sbin
    mount -t proc proc /proc || fail "cannot mount /proc: the kernel needs CONFIG_PROC_FS"
    mount -t sysfs sysfs /sys || fail "cannot mount /sys: the kernel needs CONFIG_SYSFS"
    mode="$(parameter kvmlet.rootfs)"
    tag="$(parameter root)"
    options="$(parameter rootflags)"
    fstype="$(parameter rootfstype)"
    [ -n "$tag" ] || fail "no root=TAG on the kernel command line"
    case "$fstype" in
    9p | virtiofs) ;;
    *) fail "rootfstype=$fstype: kvmlet's init mounts a 9p or virtiofs root" ;;
    esac
    missing="$(missing_kernel_options "$mode" "$fstype")"
    [ -z "$missing" ] || fail "the guest kernel lacks:$missing (see kvmlet run --help)"
    mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs on /dev"

    new=/kvmlet/root
    mkdir -p $new
    options="${options:+$options,}"
    if [ "$mode" = rw ]; then
        mount -t "$fstype" -o "${options}rw" "$tag" $new ||
            fail "cannot mount the root share $tag ($fstype)"
    else
        mkdir -p /kvmlet/lower /kvmlet/rw
        mount -t "$fstype" -o "${options}ro" "$tag" /kvmlet/lower ||
            fail "cannot mount the root share $tag ($fstype)"
        mount -t tmpfs -o mode=0755 kvmlet-overlay /kvmlet/rw || fail "cannot mount a tmpfs"
        mkdir -p /kvmlet/rw/upper /kvmlet/rw/work
        mount -t overlay -o lowerdir=/kvmlet/lower,upperdir=/kvmlet/rw/upper,workdir=/kvmlet/rw/work \
            kvmlet-root $new || fail "cannot mount the overlay on the root share"
    fi
    for directory in proc sys dev tmp run; do
        [ -d $new/$directory ] || mkdir -p $new/$directory ||
            fail "the root share has no /$directory and it cannot be made"
    done
    mount --move /proc $new/proc
    mount --move /sys $new/sys
    mount --move /dev $new/dev
    mkdir -p $new/dev/pts $new/dev/shm
    mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $new/dev/pts
    mount -t tmpfs -o mode=1777 tmpfs $new/dev/shm
    mount -t tmpfs -o mode=1777 tmpfs $new/tmp
    mount -t tmpfs -o mode=0755 tmpfs $new/run
    mkdir -p $new/run/kvmlet/bin
    cp /bin/busybox $new/run/kvmlet/busybox
    cp /init $new/run/kvmlet/init
    cp /etc/udhcpc/default.script $new/run/kvmlet/udhcpc.script
    for applet in ip grep; do # what udhcpc's script runs, whatever the root has
        ln -s ../busybox $new/run/kvmlet/bin/$applet
    done
    exec switch_root $new /run/kvmlet/busybox sh /run/kvmlet/init stage2
}

network_up() { # loopback, and a DHCP lease on every NIC (3 tries, then on in the background)
    $bb ip link set lo up
    [ -e /sys/class/net/eth0 ] || return 0
    resolver=/etc/resolv.conf
    if [ "$(parameter kvmlet.rootfs)" = rw ]; then
        resolver=/run/kvmlet/resolv.conf # never the host's own file
    else
        $bb rm -f $resolver # a link to a resolver's file under /run goes nowhere here
    fi
    for interface in /sys/class/net/eth*; do
        PATH=/run/kvmlet/bin RESOLV_CONF=$resolver $bb udhcpc -i "${interface##*/}" -b -t 3 -T 1 \
            -s /run/kvmlet/udhcpc.script >/dev/null 2>&1
    done
}

mount_shares() { # host directories shared read-write at their own paths: TYPE TAG PATH...
    while [ $# -ge 3 ]; do
        options=rw
        [ "$1" = 9p ] && options=trans=virtio,version=9p2000.L,msize=512000,cache=mmap
        $bb mkdir -p "$3" && $bb mount -t "$1" -o $options "$2" "$3" ||
            fail "cannot mount share $2 ($1) at $3"
        shift 3
    done
}

sandbox_agent() { # run the command kvmlet.sandbox left in its control share $1
    ctl=/run/kvmlet/ctl
    mkdir -p $ctl
    $bb mount -t 9p -o trans=virtio,version=9p2000.L,cache=none "$1" $ctl ||
        fail "cannot mount the sandbox control share $1"
    token="" uid=0 gid=0 groups=0 workdir=/ stdin=null mounts=""
    . $ctl/request
    mount_shares $mounts
    $bb cp $ctl/command /run/kvmlet/command
    # From here on the control share is reached through this shell's working directory
    # only: detached from the tree, the command cannot see it.
    cd $ctl && $bb umount -l $ctl
    exec 3>stdout 4>stderr
    input=/dev/null
    if [ "$stdin" = stream ]; then # chunks stdin.0, stdin.1, ... until stdin.end says how many
        input=/run/kvmlet/stdin
        $bb mkfifo $input
        (
            i=0
            while :; do
                if [ -e stdin.$i ]; then
                    $bb cat stdin.$i || break
                    i=$((i + 1))
                elif [ -e stdin.end ] && [ "$($bb cat stdin.end)" -le $i ]; then
                    break
                else
                    $bb usleep 20000
                fi
            done >$input
        ) &
        feeder=$!
    fi
    privileges=""
    if [ "$uid" != 0 ] || [ "$gid" != 0 ]; then
        setpriv="" # util-linux's (busybox's own cannot change uid)
        for candidate in /usr/bin/setpriv /bin/setpriv /usr/sbin/setpriv /sbin/setpriv; do
            [ -x $candidate ] && setpriv=$candidate && break
        done
        [ -n "$setpriv" ] ||
            fail "running the command as uid $uid needs util-linux's setpriv in the guest's root"
        privileges="$setpriv --reuid=$uid --regid=$gid --groups=$groups --"
    fi
    # The command runs in the foreground in a session of its own (so a signal reaches all of
    # it, and SIGINT is not ignored as in a background job); kvmlet asks for a signal by
    # leaving a file named signal, which a watcher passes on to that session.
    session=/run/kvmlet/session
    (   # a signal asked before the session wrote its id waits for it (killed when it ends)
        while [ ! -e signal ] || [ ! -s $session ]; do $bb usleep 50000; done
        kill -s "$($bb head -c 8 signal)" -- -"$($bb cat $session)"
    ) >/dev/null 2>&1 &
    watcher=$!
    : >started
    # Started from /: a shell whose working directory is the detached control share cannot
    # name it (getcwd fails) and says so on the command's stderr.
    (cd / && exec $bb setsid /bin/sh -c 'echo $$ >'$session'; exec '"$bb env -i $privileges"' /bin/sh /run/kvmlet/command') \
        <$input >&3 2>&4
    status=$?
    kill -s KILL -- -"$($bb cat $session)" $watcher $feeder 2>/dev/null
    $bb sync
    echo "$token $status" >status
}

stage2() {
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
    export TERM="${TERM:-linux}"
    $bb hostname kvmlet
    network_up
    control="$(parameter kvmlet.ctl)"
    run="$(parameter kvmlet.run)"
    if [ -n "$control" ]; then
        sandbox_agent "$control"
    elif [ -n "$run" ]; then
        cd /root 2>/dev/null || cd /
        $bb setsid $bb cttyhack /bin/sh -c "$(echo "$run" | $bb base64 -d)"
        echo "kvmlet-exit: $?"
    else
        echo "kvmlet-guest: ready"
        cd /root 2>/dev/null || cd /
        shell=/bin/sh
        [ -x $shell ] || shell="$bb sh"
        $bb setsid $bb cttyhack $shell -l
    fi
    $bb sync
    $bb reboot -f
}

if [ "$1" = stage2 ]; then
    stage2
else
    stage1
fi
