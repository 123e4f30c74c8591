"""snapshop: visual search for e-commerce."""

__version__ = "0.1.0"
