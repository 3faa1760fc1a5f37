"""keep_freed_memory: freed heap memory stays with the process (what CPU training's speed-up rests on)."""

import ctypes.util
import json
import platform
import subprocess
import sys

import pytest
from scripts.integration.config_runs import config_files
from scripts.utils import allocator

from conftest import BUNDLE

# Takes 192 MB in small heap blocks (below glibc's mmap threshold), frees them and reports how much the resident size
# grew in all. Nothing of Python's may be allocated on the heap between the blocks' first and last (it would hold the
# heap's top): hence the list made first and the unbuffered reads.
TAKE_AND_FREE = """
import ctypes, ctypes.util, json, os, sys
from scripts.utils.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def resident_mb():
    with open("/proc/self/statm", "rb", buffering=0) as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
blocks = [0] * 3072
before = resident_mb()
for i in range(len(blocks)):
    blocks[i] = libc.malloc(64 * 1024)
    ctypes.memset(blocks[i], 1, 64 * 1024)
for i in range(len(blocks) - 1, -1, -1):
    libc.free(blocks[i])
print(json.dumps({"kept": kept, "grew_mb": resident_mb() - before}))
"""


def _take_and_free(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", TAKE_AND_FREE, mode], cwd=BUNDLE, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_memory_stays_with_the_process():
    default, kept = _take_and_free("default"), _take_and_free("keep")
    assert default["grew_mb"] < 20  # glibc's default: the freed top of the heap goes back to the system
    assert kept["kept"] is True and kept["grew_mb"] > 150


def test_no_mallopt_is_reported_not_raised(monkeypatch):
    # a C library without mallopt (macOS's) or none found (Windows): the defaults stay, training goes on
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libno-such-c-library.so")
    assert allocator.keep_freed_memory() is False


def test_training_config_keeps_freed_memory():
    (train,) = config_files("train.json")
    assert "$keep_freed_memory()" in json.loads(open(train).read())["initialize"]
