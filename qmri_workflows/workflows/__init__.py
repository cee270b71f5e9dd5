"""Workflow factories (``init_*_wf``) that wire the interfaces into Nipype graphs."""
