"""Build steps pyproject.toml cannot declare; the package's metadata is in pyproject.toml."""
from setuptools import setup

setup()
