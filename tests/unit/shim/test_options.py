"""The shim's options are validated before anything is created (issue 9): sizes are positive
multiples of 4096 within what QEMU and the backing file system allow, every number is finite and in
range, a refusal is one line on stderr with exit 2 and leaves nothing on disk."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvsim.drivers.shim.daemon import MAX_SIZE, ShimConfig, ShimDaemon
from hvsim.drivers.shim.entry import build_parser
from hvsim.drivers.shim.errors import ShimConfigError
from hvsim.drivers.shim.process import ShimProcess
from hvsim.drivers.shim.store import BackingStore

from .conftest import run



def hvsim_shim(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    code = "import sys; from hvsim.cli import main; sys.argv[0] = 'hvsim'; main()"
    return subprocess.run([sys.executable, "-c", code, "shim", "serve", *args], capture_output=True, text=True,
                          timeout=timeout)


def fs_refused_size(directory: Path) -> int | None:
    """The smallest power-of-two size (a multiple of 4096) the file system refuses for one file, or None."""
    probe = directory / "probe.tmp"
    try:
        for bits in range(40, 63):
            fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, 2**bits)
            except OSError as exc:
                assert exc.errno == errno.EFBIG
                return 2**bits
            finally:
                os.close(fd)
                probe.unlink()
    finally:
        probe.unlink(missing_ok=True)
    return None


@pytest.mark.parametrize(("args", "needle"), [
    (["--size", "1000"], "--size must be a positive multiple of 4096"),
    (["--size", "0"], "--size must be a positive multiple of 4096"),
    (["--size", "-4096"], "--size must be a positive multiple of 4096"),
    (["--size", str(10**21)], "--size must be at most"),
    (["--size", str(2**63 - 1)], "--size must be a positive multiple of 4096"),
    (["--size", str(2**63)], "--size must be at most"),
    (["--size", "10**21"], "argument --size: invalid int value"),
    (["--size", "4096", "--latency-ms", "nan"], "--latency-ms must be a finite number"),
    (["--size", "4096", "--latency-ms", "inf"], "--latency-ms must be a finite number"),
    (["--size", "4096", "--latency-ms", "-1"], "--latency-ms must be >= 0"),
    (["--size", "4096", "--latency-ms", "1e9"], "--latency-ms must be >= 0 and <= 60000"),
    (["--size", "4096", "--bandwidth-mib-s", "0"], "--bandwidth-mib-s must be >= 0.01"),
    (["--size", "4096", "--bandwidth-mib-s", "nan"], "--bandwidth-mib-s must be a finite number"),
    (["--size", "4096", "--bandwidth-mib-s=-inf"], "--bandwidth-mib-s must be a finite number"),
    (["--size", "4096", "--prefetch-concurrency", "0"], "--prefetch-concurrency must be an integer in 1..64"),
    (["--size", "4096", "--prefetch-concurrency", "100000"], "--prefetch-concurrency must be an integer in 1..64"),
    (["--size", "4096", "--name", ""], "export name must be"),
    ([], "does not exist; pass --size to create it"),
])
def test_bad_option_is_one_line_exit_2_and_creates_nothing(sockdir: Path, args: list[str], needle: str) -> None:
    run_dir = sockdir / "run"          # does not exist yet: the shim would create it for the socket
    backing = sockdir / "b.img"
    r = hvsim_shim("--socket", str(run_dir / "s.sock"), "--backing", str(backing),
                   "--control", str(run_dir / "c.sock"), *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in lines[0], lines[0]
    assert sorted(p.name for p in sockdir.iterdir()) == [], "a refused option created something"


def test_size_beyond_the_file_system_is_refused_without_a_file(sockdir: Path) -> None:
    too_big = fs_refused_size(sockdir)
    backing = sockdir / "b.img"
    cfg = ShimConfig(socket=sockdir / "s.sock", backing=backing, size=MAX_SIZE if too_big is None else too_big)
    if too_big is None:                  # e.g. tmpfs: a sparse file of QEMU's maximum size fits
        assert cfg.validate() is cfg
    else:
        with pytest.raises(ShimConfigError, match="more than the file system holding"):
            cfg.validate()
        with pytest.raises(ShimConfigError):
            ShimDaemon(cfg)
    assert list(sockdir.iterdir()) == []


def test_existing_backing_of_unaligned_size_is_refused(sockdir: Path) -> None:
    backing = sockdir / "b.img"
    backing.write_bytes(b"\0" * 5000)
    with pytest.raises(ShimConfigError, match=r"the size of --backing .* must be a positive multiple of 4096"):
        ShimConfig(socket=sockdir / "s.sock", backing=backing).validate()
    # an explicit aligned size within the file is fine (the export is that big)
    ShimConfig(socket=sockdir / "s.sock", backing=backing, size=4096).validate()


def test_backing_store_removes_a_file_it_created_when_sizing_fails(sockdir: Path) -> None:
    """Defence in depth below validate(): BackingStore.open leaves no 0-byte file behind."""
    backing = sockdir / "b.img"
    store = BackingStore(backing, 10**21)
    with pytest.raises(ShimConfigError, match="cannot make backing"):
        store.open()
    assert not backing.exists()


def test_socket_in_a_public_directory_is_refused_before_the_backing_is_created(sockdir: Path) -> None:
    public = sockdir / "pub"
    public.mkdir()
    os.chmod(public, 0o755)
    with pytest.raises(ShimConfigError, match="must be private"):
        ShimConfig(socket=public / "s.sock", backing=sockdir / "b.img", size=4096).validate()
    assert not (sockdir / "b.img").exists()


async def test_aligned_size_serves_whole_export_to_qemu_io(sockdir: Path) -> None:
    """The issue's reproducer: an export of 1000 bytes aborted QEMU's NBD client on `read 0 1000`.
    Now the size is refused, and an aligned size serves the whole export to qemu-io."""
    bad = ShimProcess(sockdir / "bad.sock", sockdir / "bad.img", size=1000, log_path=sockdir / "bad.log")
    with pytest.raises(Exception, match="multiple of 4096"):
        await bad.start()
    assert not (sockdir / "bad.img").exists()
    async with ShimProcess(sockdir / "s.sock", sockdir / "b.img", size=3 * 4096) as shim:
        rc, out, err = await run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 12288", "-c", "read -P 0x11 0 12288",
                                 shim.nbd_uri())
        assert rc == 0 and "verification failed" not in out + err, out + err


_weird_text = st.one_of(st.text(max_size=30), st.sampled_from(
    ["nan", "inf", "-inf", "1e308", "1e309", "-0", "0x10", "4096", "8192", str(2**63), str(10**30), "", " 4096"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=_weird_text, latency=_weird_text, bandwidth=_weird_text, conc=_weird_text, name=_weird_text)
def test_any_option_values_are_parsed_or_refused_cleanly(sockdir: Path, size: str, latency: str, bandwidth: str,
                                                         conc: str, name: str) -> None:
    """Arbitrary option text: argparse refuses it (exit 2), validate() refuses it (ShimConfigError), or
    it is a valid configuration; never another exception, and nothing is created either way."""
    argv = ["serve", "--socket", str(sockdir / "run" / "s.sock"), "--backing", str(sockdir / "b.img"),
            f"--size={size}", f"--latency-ms={latency}", f"--bandwidth-mib-s={bandwidth}",
            f"--prefetch-concurrency={conc}", f"--name={name}"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 2
        return
    cfg = ShimConfig(socket=args.socket, backing=args.backing, size=args.size, latency_ms=args.latency_ms,
                     bandwidth_mib_s=args.bandwidth_mib_s, export_name=args.name,
                     prefetch_concurrency=args.prefetch_concurrency)
    try:
        cfg.validate()
    except ShimConfigError as exc:
        assert str(exc)
    else:
        assert cfg.size is not None and cfg.size > 0 and cfg.size % 4096 == 0
        assert 0 <= cfg.latency_ms <= 60_000 and 1 <= cfg.prefetch_concurrency <= 64
    assert list(sockdir.iterdir()) == []
