"""Relaxometry: R1 (DESPOT1), B1+ from AFI and the imperfect-spoiling correction (numpy/scipy)."""
