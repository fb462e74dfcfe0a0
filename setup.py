from setuptools import find_packages, setup

setup(
    name="megatron-dpsl",
    version="0.1.0",
    description="Dirichlet-Prior Shaping Loss (DPSL) for Megatron-Core mixture-of-experts routers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_dpsl", "megatron_dpsl.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "numpy",
        "tqdm",
        "packaging",
    ],
    extras_require={
        "test": [
            # the one formatter and linter (pyproject.toml [tool.ruff]; .ci/run enforces it)
            "ruff",
            "pytest>=8",
            "scipy",
            "matplotlib",
            "tensorboard",
            "safetensors",
            "psutil",
            "transformers",
            "einops",
            # six: imported by Megatron-LM megatron/training (core_v0.16.1, core_v0.19.0), whose
            # pretrain chain the launcher tests run on CPU (triton too: it imports it)
            "six",
            # triton: the fused loss kernels (megatron_dpsl/losses/dpsl_triton.py) are tested on CPU
            # under Triton's interpreter (tests/unit/losses/test_dpsl_triton.py); CUDA builds of
            # torch ship it already
            "triton",
            # property-based tests of the bad-input suite (tests/unit/*/test_*_properties.py,
            # tests/unit/config/test_layer_freq.py)
            "hypothesis",
        ],
        "plots": ["matplotlib", "tensorboard", "scipy"],
        "hf": ["safetensors"],
        # Transformer Engine builds only with CUDA (see scripts/install_gpu.sh); apex is not on the
        # index.
        "te": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "megatron-dpsl-upcycle=megatron_dpsl.upcycle.cli:main",
            "megatron-dpsl-train=megatron_dpsl.train.trainer:main",
        ]
    },
)
