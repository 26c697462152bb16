"""fastrms's version: read by the build (pyproject.toml) and hashed into the kernels' cache stamp."""

__version__ = "0.1.0"
