"""XLA's compile cache: a later run loads the step an earlier one compiled, and
a damaged or unusable cache never fails a run (job/compile_cache.py).

TensorFlow reads its cache flag once per process, so these run the real CLI
in subprocesses, on tiny data.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import numpy as np
import pytest

from job import compile_cache
from tests.conftest import run_tiny_job, start_tiny_job


def train(tmp_path, out: str, *options: str, env: dict | None = None):
    result = run_tiny_job(
        "train", "--verbose", "--deterministic", "--epochs", "1",
        "--output-dir", str(tmp_path / out), *options, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def entries(cache):
    return sorted(cache.glob("*/*.pb"))


def intact(entry) -> bool:
    """Named after its content, so that a damaged copy is recognised."""
    return entry.name.endswith(f".{hashlib.sha256(entry.read_bytes()).hexdigest()}.pb")


def weights(out):
    saved = np.load(out / "checkpoints" / "latest.npz")
    return [saved[name] for name in saved.files if name.startswith("weight_")]


def test_a_later_run_loads_the_compiled_step_and_trains_the_same(tmp_path):
    cache = tmp_path / "cache"
    first = train(tmp_path, "first", "--compile-cache", str(cache))
    assert "0 entries" in first.stderr and "1 new entries" in first.stderr
    (entry,) = entries(cache)
    assert intact(entry)
    umask = os.umask(0)
    os.umask(umask)
    assert entry.stat().st_mode & 0o777 == 0o666 & ~umask  # other users may read it

    second = train(tmp_path, "second", "--compile-cache", str(cache))
    assert "1 entries" in second.stderr and "0 new entries" in second.stderr
    assert entries(cache) == [entry]
    for a, b in zip(weights(tmp_path / "first"), weights(tmp_path / "second"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_runs_that_start_together_leave_entries_a_later_run_loads(tmp_path):
    """Both compile the step (neither finds an entry) and publish it whole:
    what a sweep starting several runs at once on a new machine does."""
    cache = tmp_path / "cache"
    args = ("train", "--deterministic", "--epochs", "1", "--compile-cache", str(cache))
    starts = [start_tiny_job(*args, "--output-dir", str(tmp_path / f"out-{i}")) for i in range(2)]
    for started in starts:
        _, stderr = started.communicate(timeout=300)
        assert started.returncode == 0, stderr[-2000:]
    assert all(intact(entry) for entry in entries(cache))
    later = train(tmp_path, "later", "--compile-cache", str(cache))
    assert "0 new entries" in later.stderr


@pytest.mark.parametrize("damage", [b"", b"not a compiled program"])
def test_a_damaged_entry_is_replaced_not_loaded(tmp_path, damage):
    cache = tmp_path / "cache"
    train(tmp_path, "first", "--compile-cache", str(cache))
    (entry,) = entries(cache)
    entry.write_bytes(damage or entry.read_bytes()[:1000])  # b"": truncated

    result = train(tmp_path, "second", "--compile-cache", str(cache))
    assert "which is damaged" in result.stderr
    assert "1 new entries" in result.stderr
    (fresh,) = entries(cache)
    assert fresh != entry and intact(fresh)


def test_a_temporary_dir_with_a_space_in_its_name_works(tmp_path):
    """TensorFlow splits its flags at spaces: the private dir's path is quoted."""
    cache, tmp = tmp_path / "cache", tmp_path / "my tmp"
    tmp.mkdir()
    for out in ("first", "second"):
        result = train(tmp_path, out, "--compile-cache", str(cache), env={"TMPDIR": str(tmp)})
    assert "0 new entries" in result.stderr
    assert not (tmp_path / "my").exists()


def test_an_unusable_cache_dir_only_costs_the_compile(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    result = train(tmp_path, "out", "--compile-cache", str(blocked / "cache"))
    assert "compiling without it" in result.stderr
    assert (tmp_path / "out" / "metrics.json").exists()


def test_no_compile_cache_leaves_the_cache_alone(tmp_path):
    cache = tmp_path / "cache"
    train(tmp_path, "out", "--compile-cache", str(cache), "--no-compile-cache")
    assert not cache.exists()


def test_the_key_changes_with_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    plain = compile_cache.machine_key(deterministic=False)
    assert compile_cache.machine_key(deterministic=True) != plain
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert compile_cache.machine_key(deterministic=False) != plain


def test_the_entries_offered_least_recently_go_when_the_cache_is_full(tmp_path):
    key = tmp_path / "tf2.21.0-0123456789abcdef"
    key.mkdir()
    for age, name in enumerate(["new", "middle", "old"]):
        entry = key / f"{name}.{hashlib.sha256(name.encode()).hexdigest()}.pb"
        entry.write_bytes(b"x" * 100)
        os.utime(entry, (1000 - age, 1000 - age))
    # Files the cache did not write are never its to delete, however old.
    theirs = [tmp_path / "model" / "saved_model.pb", key / "frozen_graph.pb"]
    for path in theirs:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1, 1))
    compile_cache._evict(tmp_path, max_bytes=250)
    assert sorted(entry.name.split(".")[0] for entry in key.glob("*.*.pb")) == ["middle", "new"]
    assert all(path.exists() for path in theirs)


def test_private_dirs_of_killed_processes_are_removed(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is free now
    here = f"{compile_cache.PRIVATE_PREFIX}{compile_cache._host()}"
    dead = tmp_path / f"{here}-{gone.pid}-x"
    alive = tmp_path / f"{here}-{os.getpid()}-x"
    # Process ids of another host (a container sharing /tmp) mean nothing here.
    elsewhere = tmp_path / f"{compile_cache.PRIVATE_PREFIX}elsewhere-{gone.pid}-x"
    other = tmp_path / "someone-else"
    for path in (dead, alive, elsewhere, other):
        path.mkdir()
    compile_cache._remove_orphans(tmp_path)
    assert not dead.exists()
    assert alive.exists() and elsewhere.exists() and other.exists()
