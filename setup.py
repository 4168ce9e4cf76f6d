"""rfwp: recurrent fast weight programmers for IMPALA agents and sequence models.

`pip install -e .` installs the pure-Python package. The fused kernels in `cuda_ext/` are built just in time
on first use; where a CUDA build of PyTorch and `nvcc` are present, `pip install --no-build-isolation -e .`
builds them ahead of time instead (`RFWP_BUILD_CUDA=1` forces that, `=0` skips it; `RFWP_BUILD_CPU=1` builds
the C++ CPU backend ahead of time on its own).
"""
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def kernel_extensions() -> dict:
    """`ext_modules`/`cmdclass` for the ahead-of-time builds `cuda_ext._cuda` and `cuda_ext._cpu`, or nothing.
    They carry the hash of their sources, so cuda_ext/loader.py ignores a build that is older than the code."""
    try:  # absent under pip's build isolation: then nothing is built ahead of time
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return {}
    forced = os.environ.get("RFWP_BUILD_CUDA")
    with_cuda = forced == "1" or (forced != "0" and torch.version.cuda is not None and cpp_extension.CUDA_HOME)
    if not (with_cuda or os.environ.get("RFWP_BUILD_CPU") == "1"):
        return {}
    sys.path.insert(0, HERE)
    from cuda_ext import loader

    extensions = []
    for name in ("cpu", "cuda") if with_cuda else ("cpu",):
        flags = loader.compile_flags(name)
        tag = [f"-DRFWP_SOURCE_HASH=0x{loader.source_hash(name)}ULL"]
        args = {"cxx": flags["cxx"] + tag, **({"nvcc": flags["nvcc"] + tag} if name == "cuda" else {})}
        kind = cpp_extension.CUDAExtension if name == "cuda" else cpp_extension.CppExtension
        sources = [os.path.relpath(p, HERE) for p in loader.sources(name)]
        extensions.append(kind(f"cuda_ext._{name}", sources, extra_compile_args=args, extra_link_args=flags["ld"]))
    return {"ext_modules": extensions, "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    name="rfwp",
    version="0.1.0",
    description="Recurrent fast weight programmers: IMPALA on Atari and POPGym, fused kernels, supervised tasks",
    python_requires=">=3.10",
    packages=find_packages(include=["agent*", "actors*", "learner*", "models*", "cuda_ext*", "tasks*", "bench*", "runio*",
                                    "configs"]),
    package_data={"cuda_ext": ["csrc/*", "csrc/**/*"], "configs": ["*.yaml"], "tasks": ["samples/**/*"]},
    install_requires=[
        "torch==2.13.0",
        "numpy>=2,<3",
        "gymnasium>=1.0,<2",
        "ale-py>=0.12,<0.13",
        "opencv-python-headless>=4.10",
        "imageio-ffmpeg>=0.5",  # bundles an ffmpeg with libx264: H.264 videos that browsers play
        "ray==2.60.*",
        "tensorboard",
        "tqdm",
        "pyyaml",
        "ninja",
        "popgym==1.0.*",
        "matplotlib",
        "rliable==1.2.*",
        "pandas<3",  # rliable needs arch<8, and arch 7 does not import with pandas 3
    ],
    extras_require={"test": ["pytest>=8", "psutil"]},
    **kernel_extensions(),
)
