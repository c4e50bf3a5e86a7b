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
nics=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    hvsim.name=*) name=${arg#hvsim.name=} ;;
    hvsim.ip=*) ipaddr=${arg#hvsim.ip=} ;;
    hvsim.gw=*) gw=${arg#hvsim.gw=} ;;
    hvsim.nic=*) nics="$nics ${arg#hvsim.nic=}" ;;
  esac
done
hostname "$name"
# IPv4 only: no IPv6 autoconfiguration chatter on tenant networks (ports drop other ethertypes)
for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6; do
  [ -w "$f" ] && echo 1 > "$f"
done
ip link set lo up
if [ -n "${ipaddr:-}" ] && [ -e /sys/class/net/eth0 ]; then
  ip addr add "$ipaddr" dev eth0 && ip link set eth0 up
  [ -n "${gw:-}" ] && ip route add default via "$gw"
fi
# hvsim.nic=MAC,IP/PREFIX[,gw=GATEWAY][,mtu=MTU] (one per ENI): the interface is found by its MAC
for spec in $nics; do
  mac=${spec%%,*}; rest=${spec#*,}; addr=${rest%%,*}; opts=${rest#"$addr"}
  dev=""
  for d in /sys/class/net/*; do
    [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && dev=${d##*/}
  done
  if [ -z "$dev" ]; then echo "hvsim-init: no interface with MAC $mac"; continue; fi
  for o in $(echo "$opts" | tr ',' ' '); do
    case "$o" in
      mtu=*) ip link set "$dev" mtu "${o#mtu=}" ;;
      gw=*) nicgw=${o#gw=} ;;
    esac
  done
  ip addr add "$addr" dev "$dev" && ip link set "$dev" up && echo "hvsim-init: $dev $mac $addr"
  if [ -n "${nicgw:-}" ] && [ -z "${gw:-}" ]; then ip route add default via "$nicgw" dev "$dev" && gw=$nicgw; fi
  nicgw=""
done
# ACPI power button: the kernel's button driver reports it as KEY_POWER on an evdev device.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\necho "hvsim-init: ACPI power button, powering off" > /dev/console\nsync\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod 0755 /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /run/acpid.log
echo "hvsim-init: starting agent"
( while true; do /bin/hvsim-agent; echo "hvsim-init: agent exited ($?), restarting"; sleep 0.2; done ) &
echo "HVSIM-READY $name"
while true; do sleep 3600; done
