"""File input/output: BIDS queries (pybids) and BIDS-derivative writing (no Nipype)."""
