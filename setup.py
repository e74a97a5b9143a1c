from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "soteria" / "version.py").read_text(), version)

setup(
    name="soteria",
    version=version["__version__"],
    description=(
        "Language-specific functional parameter steering for multilingual safety alignment "
        "of Hugging Face causal LMs, with fused Triton kernels."
    ),
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["soteria", "soteria.*", "soteria_kernels", "soteria_kernels.*"]),
    package_data={"soteria": ["data/**/*.json", "data/**/*.jsonl", "data/**/*.txt"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        # Triton wheels exist for Linux only; elsewhere the eager PyTorch path runs.
        "triton>=3.2; platform_system == 'Linux'",
        "transformers>=4.56",  # from_pretrained(..., dtype=): 4.56 renamed torch_dtype; tested on 5.x
        "safetensors>=0.4.3",
        "huggingface-hub>=0.26",
        "tqdm>=4.64",
        "numpy",
        "matplotlib>=3.7",
        "gguf>=0.10",  # GGUF input (--gguf-file) and the pip-shipped real models (soteria.models.pretrained)
        "accelerate>=1.0",  # device_map loading and GGUF loading in transformers
    ],
    extras_require={
        "judge": ["httpx>=0.27", "tenacity>=8.2"],  # the LLM judge's HTTP client and retries
        "tune": ["optuna>=4.0"],  # soteria tune: multi-objective TPE, SQLite studies
        "datasets": ["datasets>=2.14"],  # XThreatBench / MultiJail prompts and probe pairs from the Hub
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "ruff>=0.6",
            "peft>=0.13",
            "scipy",
            "httpx>=0.27",
            "tenacity>=8.2",
            "optuna>=4.0",
            "datasets>=2.14",
        ],
    },
    entry_points={"console_scripts": ["soteria=soteria.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
