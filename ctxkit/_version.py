"""The version of ctxkit (the single source for the build and ``ctxkit.__version__``)."""

__version__ = "0.1.0"
