"""Install snap_fast.

The Triton kernels live in the top-level ``kernels/`` folder and install as ``snap_fast.kernels``.
The C++ extension in ``csrc/`` is compiled on first use and cached (see ``snap_fast/_ext.py``), so
installing never needs a compiler or a CUDA toolchain, and no build environment ever pulls a
CUDA build of torch: ``torch`` is a runtime requirement only, with a floor that any recent CPU
or CUDA build satisfies.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["snap_fast", "snap_fast.*"]) + ["snap_fast.kernels", "snap_fast.csrc"]
version: dict = {}
exec(open("snap_fast/version.py", encoding="utf-8").read(), version)  # the one place the version is written

setup(
    name="snap_fast",
    version=version["__version__"],
    description="Selective unlearning for LLMs with SNAP (negative instructions, hard positives, "
    "sliced-Wasserstein regularization), with Triton and C++ kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"snap_fast.kernels": "kernels", "snap_fast.csrc": "csrc"},
    package_data={"snap_fast.csrc": ["*.cpp", "*.cu", "*.h"], "snap_fast.data": ["resources/*", "resources/tofu_sample/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy>=1.24",
        "transformers>=4.46,<6",  # 6.0 removes gradient_checkpointing_*, still called by PEFT
        "peft>=0.13",
        "accelerate>=0.34",
        "datasets>=2.20",
        "safetensors>=0.4",
        "gguf>=0.10",
        "sentencepiece>=0.2",
        "rouge-score>=0.1.2",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "ninja>=1.11",
    ],
    extras_require={
        "dev": [
            "pytest>=8.0",
            "pytest-benchmark>=4.0",
            "pytest-timeout>=2.3",
            "POT>=0.9.4",
            "ruff>=0.6",
            "torchao>=0.12",
        ],
        # the quantization attack's library quantizer (snap-fast eval --quant-library torchao-int8)
        "attacks": ["torchao>=0.12"],
    },
    entry_points={"console_scripts": ["snap-fast=snap_fast.cli:main"]},
)
