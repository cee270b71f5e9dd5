"""The 1 mm patient truth that the slow phantom tests share, built once per test session.

``make_phantom`` at 1 mm takes about half a minute and 0.5 GB, and many slow tests need exactly
that subject: the 1 mm R2* test and the MTsat test (``write_phantom_dataset(make_truth=...)``), the
session's 2 mm phantom simulated at 1 mm (``tests/workflows/conftest.py``), the 1 mm brain-mask
tests and the 1 mm truth tests. They all take the patient of seed :data:`SHARED_SEED` at 3 T with
B0 along z, so it is built once. Its arrays are read-only: a test that changed them would change
every later test's phantom, so it fails at once instead.
"""

import functools

import numpy as np

from qmri_workflows.phantom.truth import make_phantom

#: Seed of the shared 1 mm patient (and of the other phantoms of the tests that use it).
SHARED_SEED = 11
_SHARED = {"resolution": 1.0, "field_strength": 3.0, "subject": "patient", "seed": SHARED_SEED}


@functools.lru_cache(maxsize=1)
def patient_1mm():
    """The shared truth: ``make_phantom(resolution=1.0, subject="patient", seed=SHARED_SEED)``, read-only."""
    truth = make_phantom(**_SHARED)
    for value in vars(truth).values():
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return truth


def make_truth(*, resolution=1.0, field_strength=3.0, subject="patient", seed=0, b0_direction=(0, 0, 1)):
    """:func:`make_phantom`, answered from the shared truth when the arguments are its own."""
    arguments = {"resolution": resolution, "field_strength": field_strength, "subject": subject, "seed": seed}
    if arguments == _SHARED and np.array_equal(b0_direction, (0, 0, 1)):
        return patient_1mm()
    return make_phantom(**arguments, b0_direction=b0_direction)
