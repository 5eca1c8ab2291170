"""homodyne-steps: XPCS homodyne analysis under flow as a workflow of cached stages.

Importing the package is cheap (no JAX): Snakemake parses the workflow with it.
Modules that compute import JAX through :mod:`homodyne_steps._jax`, which turns on
float64 before anything is traced.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("homodyne-steps")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
