"""Cached compiled kernels are verified before loading (issue 24 item 8): a library whose bytes differ
from the SHA-256 recorded at build time, a symlink, or a file others can write is rebuilt, never loaded."""

from __future__ import annotations

import os
import shutil

import pytest

from yunque.cpu import build

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("YUNQUE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "k.cpp"
    src.write_text('extern "C" int yq_answer() { return 42; }\n')
    compiles = []
    real_run = build.subprocess.run

    def run(cmd, *a, **k):
        if "-o" in cmd:
            compiles.append(cmd)
        return real_run(cmd, *a, **k)

    monkeypatch.setattr(build.subprocess, "run", run)

    def load():
        lib = build.compile_and_load("yqtest", [src], ["-O1", "-shared", "-fPIC"], "test kernel", "no kernel")
        assert lib is not None and lib.yq_answer() == 42
        (so,) = (tmp_path / "cache" / "kernels").glob("yqtest-*.so")
        return so

    return load, compiles


def test_built_once_then_loaded_from_the_verified_cache(kernel):
    load, compiles = kernel
    so = load()
    assert len(compiles) == 1 and so.with_name(so.name + ".sha256").is_file()
    load()
    assert len(compiles) == 1


def test_a_changed_library_is_rebuilt_not_loaded(kernel, tmp_path):
    load, compiles = kernel
    so = load()
    so.write_bytes(so.read_bytes() + b"tampered")
    load()
    assert len(compiles) == 2
    assert not so.read_bytes().endswith(b"tampered")


def test_a_missing_record_or_a_symlink_or_a_writable_file_is_rebuilt(kernel, tmp_path):
    load, compiles = kernel
    so = load()
    so.with_name(so.name + ".sha256").unlink()
    load()
    assert len(compiles) == 2
    elsewhere = tmp_path / "elsewhere.so"
    shutil.copy(so, elsewhere)
    so.unlink()
    os.symlink(elsewhere, so)
    load()
    assert len(compiles) == 3 and not so.is_symlink()
    os.chmod(so, 0o777)
    load()
    assert len(compiles) == 4 and (so.stat().st_mode & 0o022) == 0
