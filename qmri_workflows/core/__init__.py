"""Numerical core: pure numpy/scipy functions on arrays (no file I/O, no Nipype)."""
