"""The CLI's allocator settings: applied on glibc Linux, left alone when the user tuned malloc
or disabled it, and, once applied, a freed block is reused without faulting its pages in
again (glibc's defaults hand it back to the kernel). Each case runs in a fresh process:
malloc settings are per process."""
import json
import os
import subprocess
import sys

import pytest

_CHILD = r"""
import json, resource, sys, torch
from guard_fast.runtime.allocator import tune_cpu_allocator
state = tune_cpu_allocator()
for _ in range(3):
    a = torch.empty(4 * 1024 * 1024).fill_(1.0); del a   # 16 MiB
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    a = torch.empty(4 * 1024 * 1024).fill_(1.0); del a
print(json.dumps({"state": state,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0}))
"""


def _run(**env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")
         and k != "GUARD_FAST_MALLOC"}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", _CHILD], env=e, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_tuned_allocator_reuses_freed_blocks_without_page_faults():
    got = _run()
    assert got["state"] == "tuned"
    # 50 x 16 MiB = 204,800 pages if each were faulted in afresh; reused heap: none
    assert got["faults"] < 1024, got


def test_allocator_left_alone_when_disabled_or_tuned_by_the_user():
    assert _run(GUARD_FAST_MALLOC="0")["state"] == "GUARD_FAST_MALLOC=0"
    assert _run(MALLOC_ARENA_MAX="2")["state"] == "MALLOC_ARENA_MAX is set"
    assert _run(LD_PRELOAD="/nonexistent/libjemalloc.so")["state"] == "jemalloc is preloaded"


def test_the_cli_applies_it(monkeypatch):
    import guard_fast.runtime.allocator as A
    from guard_fast.train import main

    calls = []
    monkeypatch.setattr(A, "tune_cpu_allocator", lambda: calls.append(1) or "tuned")
    assert main(["all", "--experiment", "nope"]) == 2
    assert calls == [1]
