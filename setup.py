"""Build of emokern and its compiled extension ``emokern._C``.

The CPU kernels are always built. The CUDA kernels are built when ``EMOKERN_BUILD_CUDA`` says so:

* ``auto`` (default): when torch is a CUDA build and ``nvcc`` is found;
* ``1``: always (the build fails if it cannot compile them);
* ``0``: never.

``EMOKERN_CUDA_ARCHS`` lists the target architectures (default ``8.0;9.0``: Ampere and Hopper), and
``MAX_JOBS`` bounds parallel compilation as for any torch extension.
"""

import glob
import os
import re
import shutil
import sysconfig

from setuptools import find_packages, setup


def _locate_cuda_home() -> None:
    # torch guesses CUDA_HOME from the nvcc on PATH; when that is a wrapper or link (/usr/local/bin/nvcc) the guess
    # (/usr/local) has no libcudart to link. Look for a toolkit that has one before torch looks.
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ:
        return
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in candidates:
        if glob.glob(os.path.join(home, "lib*", "libcudart.so*")) and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_home()

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    switch = os.environ.get("EMOKERN_BUILD_CUDA", "auto").strip().lower()
    if switch not in ("auto", "0", "1"):
        raise SystemExit(f"EMOKERN_BUILD_CUDA must be auto, 0 or 1; got {switch!r}")
    if switch == "0":
        return False
    import torch

    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    if switch == "1":
        if torch.version.cuda is None:
            raise SystemExit("EMOKERN_BUILD_CUDA=1 but torch is a CPU-only build: install a CUDA build of torch")
        if not has_nvcc:
            raise SystemExit("EMOKERN_BUILD_CUDA=1 but nvcc was not found: set CUDA_HOME or put nvcc on PATH")
        return True
    return torch.version.cuda is not None and has_nvcc


def _cuda_include_dirs():
    # pip's CUDA 13 wheels keep cusparse/cublas headers under site-packages/nvidia/cu13/include; torch's headers
    # include them, so the system toolkit alone is not enough.
    purelib = sysconfig.get_paths()["purelib"]
    return [d for d in glob.glob(os.path.join(purelib, "nvidia", "*", "include")) if os.path.isdir(d)]


def _version():
    # read, not imported: importing emokern would need torch and the extension this very build makes
    text = open(os.path.join(HERE, "emokern", "version.py"), encoding="utf-8").read()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _extensions():
    include_dirs = [os.path.join(HERE, "csrc"), os.path.join(HERE, "csrc", "include")]
    # No -std flag: torch picks the C++ standard its headers need (C++20 for torch >= 2.13, C++17 before).
    cxx_flags = ["-O3", "-fopenmp", "-DEMOKERN_CPU_ONLY"]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    if not _want_cuda():
        return [cpp_extension.CppExtension(
            "emokern._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"], py_limited_api=False)]
    archs = os.environ.get("EMOKERN_CUDA_ARCHS", "8.0;9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    cxx_flags = [f for f in cxx_flags if f != "-DEMOKERN_CPU_ONLY"] + ["-DEMOKERN_WITH_CUDA"]
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DEMOKERN_WITH_CUDA"]
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return [cpp_extension.CUDAExtension(
        "emokern._C", sources, include_dirs=include_dirs + _cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"],
        py_limited_api=False)]


setup(
    name="emokern",
    version=_version(),
    description="Find, read and steer emotion vectors inside language models: fused kernels, model patch, pipeline",
    packages=find_packages(include=["emokern", "emokern.*"]),
    package_data={"emokern": ["data/*", "data/**/*", "experiments/sandboxed/*.sh"], "emokern.ui": ["static/*"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    entry_points={"console_scripts": ["emokern = emokern.cli:main"],
                  "vllm.general_plugins": ["emokern = emokern.engines.vllm:register"],
                  "vllm.endpoint_plugins": ["emokern = emokern.engines.vllm.server:TraceEndpoint"]},
)
