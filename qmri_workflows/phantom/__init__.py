"""Digital MS-brain phantom and qMRI protocol simulator."""
