"""Builds sag_fast._C: a CppExtension on a CPU torch, a CUDAExtension where torch has CUDA and nvcc.

SAG_FAST_CUDA_ARCHS chooses the GPU architectures (default "80;90"), e.g. SAG_FAST_CUDA_ARCHS="90".
SAG_FAST_FORCE_CPU=1 builds the CPU-only extension even where CUDA is available.
SAG_FAST_NINJA=1 compiles with ninja, in parallel, where ninja is on PATH.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension


def _cuda_build() -> bool:
    import torch

    if os.environ.get("SAG_FAST_FORCE_CPU") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    # -fopenmp: at::parallel_for in the CPU kernels runs serially unless compiled with OpenMP (ATen's backend)
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if not _cuda_build():
        return cpp_extension.CppExtension("sag_fast._C", cpp, extra_compile_args={"cxx": cxx},
                                          extra_link_args=["-fopenmp"])
    archs = os.environ.get("SAG_FAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    gencode = []
    for arch in filter(None, (a.strip() for a in archs)):
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    nvcc = ["-O3", "-std=c++17", "-lineinfo"] + gencode
    return cpp_extension.CUDAExtension(
        "sag_fast._C",
        cpp + sorted(glob.glob("csrc/*.cu")),
        define_macros=[("SAG_FAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="sag_fast",
    version="0.1.0",
    description="Fast Self-Attention Guidance for diffusion models: fused Triton and CUDA kernels, diffusers integration",
    packages=find_packages(include=["sag_fast", "sag_fast.*"]),
    # diffusers: the floor is the version the test suite runs (requirements.txt pins it; tests/test_packaging.py)
    # the built-in model (a diffusers folder) and the quality benchmark's feature network ship with the package
    package_data={"sag_fast.models": ["builtin/*.json", "builtin/*/*.json", "builtin/*/*.safetensors",
                                      "builtin_cond/*.json", "builtin_cond/*/*.json", "builtin_cond/*/*.safetensors",
                                      "features/*.json", "features/*.safetensors"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "triton>=3.2; platform_system == 'Linux'", "diffusers>=0.42.1", "tqdm", "pillow"],
    extras_require={"test": ["pytest", "pytest-benchmark", "transformers"],
                    "quality": ["torchmetrics", "matplotlib"]},  # `python -m sag_fast quality`
    ext_modules=[_extension()],
    # SAG_FAST_NINJA=1 (bench/gpu_check.sh): ninja compiles the sources in parallel; else one by one
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(
        use_ninja=os.environ.get("SAG_FAST_NINJA") == "1" and shutil.which("ninja") is not None)},
    entry_points={"console_scripts": ["sag-fast=sag_fast.__main__:main"]},
)
