"""The package's metadata and layout are in pyproject.toml. The optional C++ extension is compiled just in time on
first use (aunn_fast/cpp_build.py, docs/cpp.md), so this build compiles nothing and never needs a compiler."""

from setuptools import setup

setup()
