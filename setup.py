"""rfwp: recurrent fast weight programmers for IMPALA agents and sequence models.

`pip install -e .` installs the pure-Python package. The fused kernels in `cuda_ext/` are built just in time
on first use; where a CUDA build of PyTorch and `nvcc` are present, `RFWP_BUILD_CUDA=1 pip install -e .`
builds them ahead of time instead.
"""
from setuptools import find_packages, setup

setup(
    name="rfwp",
    version="0.1.0",
    description="Recurrent fast weight programmers: IMPALA on Atari, fused kernels, supervised tasks",
    python_requires=">=3.10",
    packages=find_packages(include=["agent*", "actors*", "learner*", "models*", "cuda_ext*", "tasks*", "bench*"]),
    package_data={"cuda_ext": ["csrc/*", "csrc/**/*"], "configs": ["*.yaml"], "tasks": ["samples/**/*"]},
    install_requires=[
        "torch==2.13.0",
        "numpy>=2,<3",
        "gymnasium>=1.0,<2",
        "ale-py>=0.12,<0.13",
        "opencv-python-headless>=4.10",
        "ray==2.60.*",
        "tensorboard",
        "tqdm",
        "pyyaml",
        "ninja",
    ],
    extras_require={"test": ["pytest>=8"]},
)
