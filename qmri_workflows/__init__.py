"""qmri-workflows: quantitative MRI maps (R1, R2, R2*, PD, QSM) from raw BIDS data.

Layers, each importable without the one above it:

``qmri_workflows.core``
    Pure numpy/scipy numerics on arrays: signal models, fits, noise.
``qmri_workflows.io``
    Reading BIDS inputs (pybids) and writing BIDS derivatives (NIfTI + JSON).
``qmri_workflows.interfaces``
    Thin Nipype interfaces that load files, call the core and save results.
``qmri_workflows.workflows``, ``qmri_workflows.cli``, ``qmri_workflows.phantom``
    Workflow factories, the BIDS-App command line and the digital phantom.
"""

__version__ = "0.1.0.dev0"
