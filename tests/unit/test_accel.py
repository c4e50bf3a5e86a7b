import pytest

from qmp_bridge.accel import choose_accel
from qmp_bridge.errors import AccelProbeError


def test_env_override(monkeypatch, tmp_path):
    k = tmp_path / "k"
    k.write_bytes(b"")
    monkeypatch.setenv("HVSIM_ACCEL", "tcg")
    assert choose_accel(str(k), str(k)) == "tcg"
    monkeypatch.setenv("HVSIM_ACCEL", "KVM")
    assert choose_accel(str(k), str(k)) == "kvm"


def test_bad_override_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("HVSIM_ACCEL", "xen")
    with pytest.raises(AccelProbeError, match="HVSIM_ACCEL='xen'"):
        choose_accel(str(tmp_path / "k"), str(tmp_path / "k"))


def test_auto_without_usable_kvm_is_tcg(monkeypatch, tmp_path):
    k = tmp_path / "k"
    k.write_bytes(b"")
    monkeypatch.setenv("HVSIM_ACCEL", "auto")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    import qmp_bridge.accel as accel
    monkeypatch.setattr(accel, "_CACHE", tmp_path / "cache" / "accel.json")
    monkeypatch.setattr(accel, "_probe_kvm", lambda *a: (False, "probe guest hung"))
    assert choose_accel(str(k), str(k)) == "tcg"
    # the verdict is cached: a second call does not probe again
    monkeypatch.setattr(accel, "_probe_kvm", lambda *a: pytest.fail("probed twice"))
    assert choose_accel(str(k), str(k)) == "tcg"
