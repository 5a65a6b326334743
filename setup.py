"""Twilight's metadata, dependencies and packages are in pyproject.toml; this adds what it cannot express.

The cuda backend compiles ``csrc/`` just in time: a regular (non-editable) install keeps a copy of the sources
in ``<prefix>/share/twilight/csrc``, where ``twilight.kernels.cuda.csrc_dir()`` finds it.
"""
from glob import glob

from setuptools import setup

setup(data_files=[("share/twilight/csrc", sorted(glob("csrc/*")))])
