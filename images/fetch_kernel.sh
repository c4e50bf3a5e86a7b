#!/usr/bin/env bash
# Download Debian's current linux-image-amd64 (version resolved, not hard-coded), unpack it
# with dpkg -x, and put the kernel at OUT/vmlinuz and its module tree at CACHE/root.
set -euo pipefail
out=$1 cache=$2
mkdir -p "$out" "$cache"
cache=$(realpath "$cache")
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[ -n "$pkg" ] || { echo "fetch_kernel: cannot resolve linux-image-amd64's kernel package" >&2; exit 1; }
kver=${pkg#linux-image-}
echo "fetch_kernel: $pkg (kernel $kver)"
if ! ls "$cache"/${pkg}_*.deb >/dev/null 2>&1; then
  (cd "$cache" && chmod 0777 . && apt-get download "$pkg")
fi
rm -rf "$cache/root"
dpkg -x "$(ls "$cache"/${pkg}_*.deb | head -1)" "$cache/root"
depmod -b "$cache/root" "$kver"
cp "$cache/root/boot/vmlinuz-$kver" "$out/vmlinuz"
echo "$kver" > "$out/kernel-version"
