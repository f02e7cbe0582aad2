"""Builds mbwq_ops._C: the CPU kernels always, the CUDA kernels when torch has CUDA and a
CUDA toolkit is found (never gated on a GPU being present, so a GPU-less build box works)."""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda():
    if os.environ.get("MBWQ_FORCE_CPU", "0") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


cxx_flags = ["-O3", "-std=c++17"]
if want_cuda():
    ext = cpp_extension.CUDAExtension(
        "mbwq_ops._C",
        sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp") + sources("csrc/cuda/*.cpp")
        + sources("csrc/cuda/*.cu"),
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": [
                "-O3",
                "-std=c++17",
                "-lineinfo",
                # Hopper SASS (sm_90a unlocks wgmma/setmaxnreg) + compute_80 PTX, which the
                # driver compiles once for Ampere and anything else newer than sm_80
                "-gencode=arch=compute_90a,code=sm_90a",
                "-gencode=arch=compute_80,code=compute_80",
                # compile the targets of one file in parallel (the unrolled decoders are big)
                "--threads=2",
            ],
        },
    )
else:
    ext = cpp_extension.CppExtension(
        "mbwq_ops._C",
        sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp"),
        extra_compile_args={"cxx": cxx_flags},
    )

setup(ext_modules=[ext], cmdclass={"build_ext": cpp_extension.BuildExtension})
