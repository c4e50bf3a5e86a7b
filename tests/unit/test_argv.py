import pytest

from qmp_bridge.machine import Drive, MachineSpec, MachineSpecError, Nic, SerialPort, build_argv


@pytest.fixture
def files(tmp_path):
    k, i = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    k.write_bytes(b"k")
    i.write_bytes(b"i")
    return str(k), str(i), str(tmp_path / "console.log")


def spec(files, **kw):
    k, i, c = files
    return MachineSpec(name=kw.pop("name", "g1"), memory_mib=kw.pop("memory_mib", 256), vcpus=kw.pop("vcpus", 2),
                       kernel=k, initrd=i, console_log=c, **kw)


def opt_values(argv, flag):
    return [argv[n + 1] for n, a in enumerate(argv) if a == flag]


def test_basic_machine(files):
    argv = build_argv(spec(files, qmp_fd=7))
    assert argv[0] == "qemu-system-x86_64"
    assert opt_values(argv, "-m") == ["256"] and opt_values(argv, "-smp") == ["2"]
    assert opt_values(argv, "-machine") == ["q35,accel=tcg"]
    assert "socket,id=qmp0,fd=7" in opt_values(argv, "-chardev")
    assert "chardev=qmp0,mode=control" in opt_values(argv, "-mon")
    append = opt_values(argv, "-append")[0]
    assert "zswap.enabled=0" in append and "console=ttyS0" in append and "hvsim.name=g1" in append
    assert "-nodefaults" in argv and "-incoming" not in argv
    assert "virtio-balloon-pci,id=balloon0,free-page-reporting=off" in opt_values(argv, "-device")


def test_devices(files):
    argv = build_argv(spec(files,
        drives=(Drive("d0", "/tmp/x.img"), Drive("swap", "/run/s.sock", kind="nbd", export="swap", reconnect_delay=5)),
        nics=(Nic("n0", "52:54:00:00:00:01", backend="tap", ifname="tap0"),),
        serial_ports=(SerialPort("agent0", "org.hvsim.agent", "/tmp/a.sock"),),
        incoming="defer", balloon=False))
    blockdevs = opt_values(argv, "-blockdev")
    assert "driver=raw,node-name=d0,file=d0-file" in blockdevs
    assert ("driver=nbd,node-name=swap,server.type=unix,server.path=/run/s.sock,export=swap,reconnect-delay=5"
            in blockdevs)
    devices = opt_values(argv, "-device")
    assert "virtio-blk-pci,drive=swap,id=swap-dev,serial=swap" in devices
    assert "virtserialport,bus=vser0.0,chardev=agent0,name=org.hvsim.agent,id=agent0-port" in devices
    assert not any(d.startswith("virtio-balloon") for d in devices)
    assert "tap,id=n0,ifname=tap0,script=no,downscript=no" in opt_values(argv, "-netdev")
    assert opt_values(argv, "-incoming") == ["defer"]


def test_user_net_is_restricted(files):
    argv = build_argv(spec(files, nics=(Nic("n0", "52:54:00:00:00:01"),)))
    assert "user,id=n0,restrict=on" in opt_values(argv, "-netdev")


@pytest.mark.parametrize("kw,match", [
    ({"memory_mib": 8}, "memory_mib"), ({"vcpus": 0}, "vcpus"), ({"name": "bad name"}, "machine name"),
    ({"drives": (Drive("d0", "/a,b"),)}, "','"),
    ({"drives": (Drive("x", "/a"),), "nics": (Nic("x", "52:54:00:00:00:01"),)}, "duplicate device ids"),
    ({"nics": (Nic("n0", "52:54:00:00:00:0G"),)}, "bad MAC"),
    ({"nics": (Nic("n0", "52:54:00:00:00:01", backend="tap"),)}, "needs ifname"),
    ({"drives": (Drive("d0", "/s", kind="nbd", fmt="qcow2"),)}, "must be raw"),
])
def test_bad_specs(files, kw, match):
    with pytest.raises(MachineSpecError, match=match):
        build_argv(spec(files, **kw))


def test_missing_kernel(tmp_path):
    s = MachineSpec(name="g", memory_mib=64, vcpus=1, kernel=str(tmp_path / "nope"), initrd=str(tmp_path / "nope2"),
                    console_log=str(tmp_path / "c"))
    with pytest.raises(MachineSpecError, match="make images"):
        build_argv(s)
