"""The version of memoa-fast, in one place.

Read by setuptools at build time (``[tool.setuptools.dynamic]`` in
``pyproject.toml``, without importing the package or Numba) and re-exported
as :data:`memoa_fast.__version__`.
"""

__version__ = "0.1.0"
