#!/bin/sh
# hvsim guest init (PID 1). Mount, load virtio modules in dependency order, disable zswap,
# configure from the kernel command line, start acpid (ACPI power button -> poweroff) and the agent.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
echo "hvsim-init: loading modules"
while read -r mod; do
  insmod "/lib/modules/$mod" 2>/dev/null || echo "hvsim-init: insmod $mod failed"
done < /etc/modules.order
# zswap would keep swapped pages in RAM and hide swap I/O from the disk.
[ -w /sys/module/zswap/parameters/enabled ] && echo 0 > /sys/module/zswap/parameters/enabled
echo "hvsim-init: zswap=$(cat /sys/module/zswap/parameters/enabled 2>/dev/null)"
name=guest
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    hvsim.name=*) name=${arg#hvsim.name=} ;;
    hvsim.ip=*) ipaddr=${arg#hvsim.ip=} ;;
    hvsim.gw=*) gw=${arg#hvsim.gw=} ;;
  esac
done
hostname "$name"
ip link set lo up
if [ -n "${ipaddr:-}" ] && [ -e /sys/class/net/eth0 ]; then
  ip addr add "$ipaddr" dev eth0 && ip link set eth0 up
  [ -n "${gw:-}" ] && ip route add default via "$gw"
fi
# ACPI power button: the kernel's button driver reports it as KEY_POWER on an evdev device.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\necho "hvsim-init: ACPI power button, powering off" > /dev/console\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod 0755 /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /run/acpid.log
echo "hvsim-init: starting agent"
( while true; do /bin/hvsim-agent; echo "hvsim-init: agent exited ($?), restarting"; sleep 0.2; done ) &
echo "HVSIM-READY $name"
while true; do sleep 3600; done
