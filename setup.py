"""The C extension only; everything else about the package is in pyproject.toml.

`dataflow/_speedups.c` holds the parse step's and the Arrow conversion's
per-value loops. It is optional: without a C compiler the build skips it and
the pure-Python code runs instead (dataflow/speedups.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("dataflow._speedups", ["dataflow/_speedups.c"], optional=True)])
