"""Package metadata for Twilight (library ``twilight``, evaluations ``twilight_eval``)."""
from glob import glob

from setuptools import find_packages, setup

setup(
    name="twilight",
    version="0.1.0",
    description="Adaptive sparse attention for long-context decoding by hierarchical top-p pruning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=(find_packages(include=["twilight", "twilight.*"])
              + ["twilight_eval"] + [f"twilight_eval.{p}" for p in find_packages("eval")]),
    package_dir={"twilight_eval": "eval"},
    package_data={"twilight_eval": ["data/*"]},
    include_package_data=True,
    # The cuda backend compiles these just in time; a regular (non-editable) install keeps a copy here.
    data_files=[("share/twilight/csrc", sorted(glob("csrc/*")))],
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        # The HF integration is tested against the transformers 5.x cache and attention interfaces.
        "transformers>=5.0,<6",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "triton>=3.0", "gguf>=0.10", "accelerate>=0.30", "datasets>=2.19",
                 "matplotlib>=3.7", "rouge-score>=0.1.2", "rapidfuzz>=3.0"],
        "eval": ["datasets>=2.19", "gguf>=0.10", "accelerate>=0.30", "matplotlib>=3.7", "rouge-score>=0.1.2",
                 "rapidfuzz>=3.0"],
        "gpu": ["triton>=3.0", "flashinfer-python>=0.2"],
    },
    entry_points={"console_scripts": ["twilight=twilight.cli:main"]},
)
