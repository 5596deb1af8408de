"""Build and install guard_fast (package ``guard_fast``, Triton kernels as ``guard_fast.kernels``).

The extension ``guard_fast._C`` (csrc/) always gets its C++ CPU kernels; its CUDA kernels
(csrc/ops_cuda.cu) are added when torch is a CUDA build and an nvcc is found, unless
``GUARD_FAST_SKIP_CUDA_BUILD=1``. ``guard_fast._C.cuda_compiled()`` reports which it got.

    pip install --no-build-isolation -e .           # editable, builds guard_fast._C
    python setup.py build_ext --inplace             # extension only, into guard_fast/
    GUARD_FAST_SKIP_CUDA_BUILD=1 pip install ...    # CPU kernels only (fast build)

Environment read here (flags are on only when exactly "1"):
  GUARD_FAST_SKIP_CUDA_BUILD  "1": do not compile CUDA kernels.
  GUARD_FAST_DEBUG_BUILD      "1": keep host debug info (-g) in the C++ objects.
  CUDA_HOME / CUDA_PATH       toolkit root; when unset, found from the nvcc on PATH.
  TORCH_CUDA_ARCH_LIST        GPU targets; default "8.0;9.0+PTX" (A100, H100/H200, and PTX
                              that newer GPUs can JIT-compile).
  MAX_JOBS                    parallel compile jobs; default min(4, CPUs): there are only
                              six translation units, and nvcc needs ~1-2 GB each.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"  # relative paths keep absolute build paths out of the wheel's records


def _flag(name: str) -> bool:
    return os.environ.get(name, "") == "1"


def _nvcc_on_path() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc


def _toolkit_root(nvcc: str) -> str | None:
    """Root of the toolkit `nvcc` belongs to.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a
    wrapper script or a symlink farm (here /usr/local/bin/nvcc execs
    /usr/local/cuda-13.0/bin/nvcc, and the guess /usr/local has no CUDA headers). nvcc
    itself knows: `nvcc --dryrun` prints `#$ TOP=<root>/bin/..`.
    """
    def ok(root: str) -> bool:
        return os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))

    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cu")
            open(src, "w").close()
            out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + "\n" + out.stderr, re.MULTILINE)
        if m:
            root = os.path.realpath(m.group(1).strip())
            if ok(root):
                return root
    except (OSError, subprocess.SubprocessError):
        pass
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return root if ok(root) else None


def _nvcc_major(nvcc: str) -> int | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


def _nvidia_wheel_includes(cuda_major: int) -> list[str]:
    """Header folders of the pip CUDA wheels (nvidia-cublas, nvidia-cusparse, ...).

    torch's ATen/cuda headers include cublas_v2.h / cusparse.h, which a bare toolkit (as
    here) may lack; the wheels torch depends on ship them under site-packages/nvidia/
    cu13/include (CUDA 13) or nvidia/<lib>/include (CUDA 12).
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs: list[str] = []
    for base in spec.submodule_search_locations:
        dirs += [d for d in [os.path.join(base, f"cu{cuda_major}", "include")] if os.path.isdir(d)]
        dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "include"))
                       if os.path.isfile(os.path.join(d, "cublas_v2.h"))
                       or os.path.isfile(os.path.join(d, "cusparse.h")))
    return list(dict.fromkeys(dirs))


def _plan_cuda() -> tuple[str | None, str]:
    """(toolkit root or None, reason). Must run before torch.utils.cpp_extension is imported:
    that module reads CUDA_HOME once, at import."""
    if _flag("GUARD_FAST_SKIP_CUDA_BUILD"):
        return None, "GUARD_FAST_SKIP_CUDA_BUILD=1"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        nvcc = os.path.join(home, "bin", "nvcc")
        if not os.path.exists(nvcc):
            return None, f"CUDA_HOME={home} has no bin/nvcc"
        return home, f"nvcc from CUDA_HOME={home}"
    nvcc = _nvcc_on_path()
    if nvcc is None:
        return None, "no nvcc on PATH and CUDA_HOME is unset"
    root = _toolkit_root(nvcc)
    if root is None:
        return None, f"could not find the CUDA toolkit root of {nvcc}"
    os.environ["CUDA_HOME"] = root
    return root, f"nvcc {nvcc} -> toolkit {root}"


def _extensions():
    cuda_home, why = _plan_cuda()

    import torch  # noqa: F401  (after CUDA_HOME is settled)

    if cuda_home is not None and torch.version.cuda is None:
        cuda_home, why = None, f"torch {torch.__version__} is a CPU-only build"
    if cuda_home is not None:
        major = _nvcc_major(os.path.join(cuda_home, "bin", "nvcc"))
        torch_major = int(torch.version.cuda.split(".")[0])
        if major is not None and major != torch_major:
            cuda_home, why = None, (f"nvcc is CUDA {major} but torch was built with CUDA "
                                    f"{torch.version.cuda} (the majors must match)")

    from torch.utils import cpp_extension as ce

    if cuda_home is not None and ce.CUDA_HOME != cuda_home:
        ce.CUDA_HOME = cuda_home  # torch.utils.cpp_extension was imported before us

    os.environ.setdefault("MAX_JOBS", str(min(4, os.cpu_count() or 1)))
    sources = [os.path.join(CSRC, f)
               for f in ("common.cpp", "ops_cpu.cpp", "attack_steps_cpu.cpp", "fab_cpu.cpp",
                         "instance_norm_cpu.cpp", "pool_cpu.cpp", "register.cpp")]
    # Python's own CFLAGS carry -g, which doubles the C++ compile time here (45 s -> 22 s
    # for ops_cpu.cpp): drop it unless GUARD_FAST_DEBUG_BUILD=1.
    cxx = ["-O3"] + ([] if _flag("GUARD_FAST_DEBUG_BUILD") else ["-g0"])
    ldflags: list[str] = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP code: without -fopenmp it runs on one thread.
        # The resulting libgomp.so.1 dependency resolves to the copy torch already loaded.
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")

    if cuda_home is None:
        print(f"guard_fast: building the C++ CPU kernels only ({why})", flush=True)
        return [ce.CppExtension("guard_fast._C", sources, extra_compile_args={"cxx": cxx},
                                extra_link_args=ldflags)]

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    torch_major = int(torch.version.cuda.split(".")[0])
    # -isystem: searched after the toolkit's own -I folder, so the wheels' copies of
    # cuda_runtime.h & co. never shadow the headers of the nvcc in use.
    wheel_inc = [f for d in _nvidia_wheel_includes(torch_major) for f in ("-isystem", d)]
    nvcc = ["-O3", "-lineinfo"] + wheel_inc  # no --use_fast_math: keep IEEE sqrt and division
    print(f"guard_fast: building C++ CPU and CUDA kernels ({why}; "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})", flush=True)
    cuda_sources = [os.path.join(CSRC, f) for f in ("ops_cuda.cu", "attack_steps_cuda.cu")]
    return [ce.CUDAExtension("guard_fast._C", sources + cuda_sources,
                             define_macros=[("GUARD_FAST_WITH_CUDA", None)],
                             extra_compile_args={"cxx": cxx + wheel_inc, "nvcc": nvcc},
                             extra_link_args=ldflags)]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


# guard_fast and its subpackages from guard_fast/; the top-level kernels/ folder is
# installed as guard_fast.kernels (never as a top-level `kernels`).
packages = find_packages(include=["guard_fast", "guard_fast.*"])
package_dir = {"guard_fast.kernels": "kernels"}
packages.append("guard_fast.kernels")
for sub in find_packages(where="kernels"):
    packages.append(f"guard_fast.kernels.{sub}")
    package_dir[f"guard_fast.kernels.{sub}"] = os.path.join("kernels", *sub.split("."))

setup(
    name="guard-fast",
    version="0.1.0",
    description="Fast, faithful adversarially robust dataset distillation (GUARD)",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    install_requires=["torch>=2.6", "torchvision", "numpy", "tqdm", "mlxtend>=0.23", "pillow"],
    extras_require={
        "test": ["pytest", "pytest-xdist>=3.5", "hypothesis>=6.100", "torchattacks==3.5.1", "pyautoattack==0.2.0",
                 "nvidia-dali-cuda130"],
        "dali": ["nvidia-dali-cuda130"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    zip_safe=False,
)
