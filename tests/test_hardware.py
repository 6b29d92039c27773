"""Machine probe and the decisions made from it (pure functions of a Machine or its figures)."""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import os

import pytest

from backends import sizing
from backends.base import MachineFigures

from assistant.machine import hardware
from assistant.machine.choice import BackendChoice, BackendChoiceError, choose_backend
from assistant.machine.hardware import (
    Machine,
    backend_availability,
    figures,
    fits_in_memory,
    parse_cpuinfo,
    parse_meminfo,
    pick_context,
    pick_threads,
    probe,
)

GiB = 1024**3
astuple = dataclasses.astuple
MiB = 1024**2
BOTH = {"llama.cpp": (True, "found"), "mlx": (True, "found")}
NO_MLX = {"llama.cpp": (True, "found"), "mlx": (False, "mlx-lm not installed")}


def machine(**changes) -> Machine:
    base = Machine(
        os="linux", arch="x86_64", platform_tag="linux-x86_64", hostname="test",
        cpu_model="Test CPU", physical_cores=8, logical_cores=16,
        ram_total_bytes=16 * GiB, ram_available_bytes=12 * GiB,
        apple_silicon=False, chip=None, gpu=[],
    )
    return dataclasses.replace(base, **changes)


def mac(**changes) -> Machine:
    fields = dict(os="darwin", arch="arm64", platform_tag="darwin-arm64", apple_silicon=True,
                  chip="Apple M2 Pro", gpu=["metal"], physical_cores=10, logical_cores=10,
                  performance_cores=6)
    return machine(**{**fields, **changes})


# --- probe ------------------------------------------------------------------------


def test_probe_on_this_machine():
    m = probe()
    assert m.os and m.arch and m.platform_tag == f"{m.os}-{m.arch}"
    assert 1 <= m.physical_cores <= m.logical_cores <= (os.cpu_count() or 1)
    assert m.ram_total_bytes is not None and m.ram_total_bytes > 0
    if m.ram_available_bytes is not None:
        assert 0 <= m.ram_available_bytes <= m.ram_total_bytes
    assert isinstance(m.gpu, list)
    data = m.to_dict()
    assert data["platform_tag"] == m.platform_tag and data["gpu"] == m.gpu


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_probe_respects_cpu_affinity():
    assert probe().logical_cores <= len(os.sched_getaffinity(0))


def test_probe_never_raises_when_everything_fails(monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(hardware.Path, "read_text", boom)
    monkeypatch.setattr(hardware.subprocess, "run", boom)
    m = probe()
    assert m.physical_cores >= 1 and m.logical_cores >= 1
    assert m.cpu_model is None


def test_probe_on_a_mac(monkeypatch):
    """The macOS branch, fed what sysctl and vm_stat say on an M2 Pro."""
    answers = {"hw.optional.arm64": "1", "machdep.cpu.brand_string": "Apple M2 Pro", "hw.physicalcpu": "10",
               "hw.logicalcpu": "10", "hw.perflevel0.physicalcpu": "6", "hw.memsize": str(16 * GiB)}
    monkeypatch.setattr(hardware.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(hardware, "_sysctl", answers.get)
    monkeypatch.setattr(hardware, "_darwin_available_bytes", lambda: 9 * GiB)
    m = probe()
    assert dataclasses.replace(m, hostname="test") == mac(cpu_model="Apple M2 Pro", ram_available_bytes=9 * GiB,
                                                          unified_memory=True)
    # an x86_64 Python under Rosetta on the same Mac
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    m = probe()
    assert (m.platform_tag, m.apple_silicon, m.gpu) == ("darwin-x86_64", True, ["metal"])


CPUINFO_SMT = "".join(
    f"processor\t: {cpu}\nmodel name\t: Test CPU @ 3GHz\nphysical id\t: 0\ncore id\t\t: {cpu % 4}\n\n"
    for cpu in range(8)
)


def test_parse_cpuinfo_counts_unique_cores():
    assert parse_cpuinfo(CPUINFO_SMT) == ("Test CPU @ 3GHz", 4)
    # Two sockets reuse core ids: (physical id, core id) pairs keep them apart.
    two_sockets = CPUINFO_SMT + CPUINFO_SMT.replace("physical id\t: 0", "physical id\t: 1").replace(
        "processor\t: ", "processor\t: 1")
    assert parse_cpuinfo(two_sockets)[1] == 8


def test_parse_cpuinfo_honours_affinity():
    assert parse_cpuinfo(CPUINFO_SMT, allowed={0, 4})[1] == 1  # SMT siblings of one core
    assert parse_cpuinfo(CPUINFO_SMT, allowed={0, 1})[1] == 2


def test_parse_cpuinfo_without_topology():
    arm = "processor\t: 0\nBogoMIPS\t: 48.00\n\nprocessor\t: 1\n\nHardware\t: Example SoC\n"
    assert parse_cpuinfo(arm) == ("Example SoC", None)


def test_parse_meminfo():
    info = parse_meminfo("MemTotal:       16384 kB\nMemAvailable:    8192 kB\nHugePages_Total:  0\n")
    assert info == {"MemTotal": 16 * MiB, "MemAvailable": 8 * MiB, "HugePages_Total": 0}


# --- backend choice -----------------------------------------------------------------


def test_auto_picks_mlx_on_apple_silicon_with_mlx():
    backend, reason = astuple(choose_backend("auto", mac(), BOTH))
    assert backend == "mlx"
    assert "Apple Silicon" in reason


def test_auto_picks_llama_cpp_on_linux_even_with_mlx():
    backend, reason = astuple(choose_backend("auto", machine(), BOTH))
    assert backend == "llama.cpp"
    assert "linux-x86_64" in reason


def test_auto_on_apple_silicon_without_mlx():
    backend, reason = astuple(choose_backend("auto", mac(), NO_MLX))
    assert backend == "llama.cpp"
    assert "mlx-lm not installed" in reason


def test_auto_under_rosetta_picks_llama_cpp():
    backend, reason = astuple(choose_backend("auto", mac(arch="x86_64", platform_tag="darwin-x86_64"), BOTH))
    assert backend == "llama.cpp" and "Rosetta" in reason


@pytest.mark.parametrize("pinned", ["llama.cpp", "mlx"])
def test_pinned_backend_is_returned_even_if_unavailable(pinned):
    """An unavailable choice is an error that still says what was chosen (doctor shows it)."""
    nothing = {"llama.cpp": (False, "missing"), "mlx": (False, "missing")}
    with pytest.raises(BackendChoiceError) as err:
        choose_backend(pinned, machine(), nothing)
    assert astuple(err.value.choice) == (pinned, "pinned in config")
    assert str(err.value) == f"backend {pinned!r} is not available: missing"


def test_unknown_backend_lists_known_ones():
    with pytest.raises(ValueError, match="auto, llama.cpp, mlx"):
        choose_backend("cuda", machine(), BOTH)


def test_none_means_auto_and_a_plugin_backend_can_be_pinned():
    assert choose_backend(None, machine(), BOTH) == choose_backend("auto", machine(), BOTH)
    with_plugin = {**BOTH, "scripted": (True, "always")}
    assert choose_backend("scripted", machine(), with_plugin) == BackendChoice("scripted", "pinned in config")
    with pytest.raises(BackendChoiceError) as err:
        choose_backend("scripted", machine(), BOTH)  # not registered: unknown
    assert str(err.value) == "unknown backend 'scripted'; known backends: auto, llama.cpp, mlx"
    assert err.value.choice is None


def test_auto_whose_pick_is_unavailable_says_why():
    with pytest.raises(BackendChoiceError, match="backend 'llama.cpp' is not available: no wheel") as err:
        choose_backend("auto", machine(), {"llama.cpp": (False, "no wheel"), "mlx": (True, "found")})
    assert err.value.choice.name == "llama.cpp" and "linux-x86_64" in err.value.choice.reason
    # a registry without llama.cpp at all
    with pytest.raises(BackendChoiceError, match="'llama.cpp' is not available: not installed"):
        choose_backend("auto", machine(), {"scripted": (True, "always")})


def test_backend_availability_shape():
    available = backend_availability()
    assert set(available) == {"llama.cpp", "mlx"}
    installed = importlib.util.find_spec("llama_cpp") is not None
    assert available["llama.cpp"][0] is installed
    assert all(isinstance(ok, bool) and why for ok, why in available.values())


def test_backend_availability_does_not_import(monkeypatch):
    seen = []

    def fake_find_spec(name, *args):
        seen.append(name)
        return importlib.machinery.ModuleSpec(name, None, origin=f"/site/{name}/__init__.py")

    monkeypatch.setattr(hardware.importlib.util, "find_spec", fake_find_spec)
    available = backend_availability()
    assert available["llama.cpp"] == (True, "llama-cpp-python found (/site/llama_cpp)")
    assert available["mlx"][0] is True
    assert {"llama_cpp", "mlx_lm"} <= set(seen)

    monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name, *a: None)
    available = backend_availability()
    assert available["mlx"][0] is False and "mlx-lm" in available["mlx"][1]
    assert available["llama.cpp"][0] is False and "pip install" in available["llama.cpp"][1]


# --- threads --------------------------------------------------------------------------


@pytest.mark.parametrize(("physical", "logical"), [(1, 1), (2, 4), (4, 4)])
def test_threads_small_machines_use_every_core(physical, logical):
    threads, reason = pick_threads(machine(physical_cores=physical, logical_cores=logical))
    assert threads == physical
    assert "none is left spare" in reason


def test_threads_use_physical_not_logical_cores():
    threads, reason = pick_threads(machine(physical_cores=8, logical_cores=16))
    assert threads == 8
    assert "8 physical" in reason and "16 logical" in reason


def test_threads_apple_silicon_uses_performance_cores():
    threads, reason = pick_threads(mac())
    assert threads == 6 and "performance cores" in reason


def test_threads_at_least_one():
    assert pick_threads(machine(physical_cores=0, logical_cores=0))[0] == 1


def test_threads_without_a_physical_core_count_use_the_logical_cpus():
    threads, reason = pick_threads(MachineFigures(physical_cores=None, logical_cores=6, ram_total_bytes=None,
                                                  ram_available_bytes=None))
    assert threads == 6 and "logical" in reason and "physical cores unknown" in reason


# --- the figures backends are sized by ---------------------------------------------------


def test_figures_carry_what_the_sizing_needs_and_size_alike():
    m = mac(ram_available_bytes=3 * GiB)
    f = figures(m)
    assert f == MachineFigures(physical_cores=10, logical_cores=10, ram_total_bytes=16 * GiB,
                               ram_available_bytes=3 * GiB, performance_cores=6)
    assert pick_threads(f) == pick_threads(m)
    for train in (256, 8192, 131072):
        kw = dict(train_ctx=train, model_bytes=2 * GiB, kv_bytes_per_token=MiB, requested=None)
        assert pick_context(f, **kw) == pick_context(m, **kw)
    assert fits_in_memory(f, GiB, GiB) == fits_in_memory(m, GiB, GiB)
    # hardware hands doctor the same functions the backends use
    assert (hardware.pick_threads, hardware.pick_context, hardware.fits_in_memory) == \
        (sizing.pick_threads, sizing.pick_context, sizing.fits_in_memory)


def test_measure_without_a_probe():
    f = sizing.measure()
    assert f.physical_cores is None and 1 <= f.logical_cores <= (os.cpu_count() or 1)
    if os.path.exists("/proc/meminfo"):
        info = parse_meminfo(open("/proc/meminfo").read())
        assert f.ram_total_bytes == info["MemTotal"]
        assert 0 < f.ram_available_bytes <= f.ram_total_bytes


# --- context ----------------------------------------------------------------------------


def test_context_requested_is_used():
    assert pick_context(machine(), train_ctx=8192, model_bytes=GiB, kv_bytes_per_token=MiB,
                        requested=2048) == (2048, "2048: set in config")


def test_context_requested_is_capped_at_training_context():
    ctx, reason = pick_context(machine(), train_ctx=8192, model_bytes=GiB, kv_bytes_per_token=None,
                               requested=32768)
    assert ctx == 8192
    assert "32768" in reason and "capped" in reason


def test_context_auto_caps_at_4096():
    ctx, reason = pick_context(machine(), train_ctx=131072, model_bytes=GiB, kv_bytes_per_token=64 * 1024,
                               requested=None)
    assert ctx == 4096 and "131072" in reason and "fits" in reason


def test_context_auto_uses_smaller_training_context():
    ctx, reason = pick_context(machine(), train_ctx=2048, model_bytes=GiB, kv_bytes_per_token=None,
                               requested=None)
    assert ctx == 2048 and "training context" in reason


def test_context_shrinks_to_fit_memory():
    # 4 GiB available, 2 GiB model: half of the 2 GiB left = 1 GiB for a 1 MiB/token cache -> 1024.
    m = machine(ram_available_bytes=4 * GiB)
    ctx, reason = pick_context(m, train_ctx=8192, model_bytes=2 * GiB, kv_bytes_per_token=MiB, requested=None)
    assert ctx == 1024
    assert "reduced from 4096" in reason
    # Rounded down to a multiple of 256.
    ctx, _ = pick_context(m, train_ctx=8192, model_bytes=2 * GiB, kv_bytes_per_token=MiB + 1, requested=None)
    assert ctx == 768


def test_context_never_below_512():
    m = machine(ram_available_bytes=3 * GiB)
    ctx, reason = pick_context(m, train_ctx=8192, model_bytes=4 * GiB, kv_bytes_per_token=MiB, requested=None)
    assert ctx == 512 and "minimum" in reason and "no room" in reason
    ctx, _ = pick_context(m, train_ctx=8192, model_bytes=2 * GiB, kv_bytes_per_token=10 * MiB, requested=None)
    assert ctx == 512


def test_context_tiny_training_context_is_not_raised_to_512():
    m = machine(ram_available_bytes=GiB)
    ctx, _ = pick_context(m, train_ctx=256, model_bytes=2 * GiB, kv_bytes_per_token=MiB, requested=None)
    assert ctx == 256


def test_context_unknown_ram_skips_memory_check():
    m = machine(ram_available_bytes=None)
    ctx, _ = pick_context(m, train_ctx=8192, model_bytes=100 * GiB, kv_bytes_per_token=MiB, requested=None)
    assert ctx == 4096


# --- memory ---------------------------------------------------------------------------------


def test_fits_in_memory():
    ok, reason = fits_in_memory(machine(), 4 * GiB, 512 * MiB)
    assert ok and "4.5 GiB" in reason and "12.0 GiB available" in reason


def test_does_not_fit_in_available_memory():
    ok, reason = fits_in_memory(machine(), 11 * GiB, 2 * GiB)
    assert not ok and "close other programs" in reason


def test_does_not_fit_in_the_machine():
    ok, reason = fits_in_memory(machine(), 20 * GiB, GiB)
    assert not ok and "more than this machine has" in reason


def test_fits_with_unknown_ram():
    ok, reason = fits_in_memory(machine(ram_total_bytes=None, ram_available_bytes=None), 100 * GiB, GiB)
    assert ok and "unknown" in reason
