"""The visual report of the BIDS App: one HTML page per subject (:mod:`.subject`), figures (:mod:`.figures`).

The report reads what the participant level published (maps, masks, tables and their sidecars)
and what the App knows of the run (the plan, the steps that ran or failed, the options); it does no
fitting of its own. It is kept apart from the numerical core and imports matplotlib only when it
draws.
"""
