"""Lesion stages against the phantom's truth: the confusion table the lesion tests print."""

from __future__ import annotations

from collections import Counter

from qmri_workflows.core.lesions import LESION_STAGES


def confusion_table(truth_stages, found_stages):
    """Text table: one row per truth stage, one column per stage found (undetermined included).

    Parameters
    ----------
    truth_stages, found_stages : sequence of str
        Stage of each lesion in the truth and as the analysis found it, in the same order.

    Returns
    -------
    str
    """
    counts = Counter(zip(truth_stages, found_stages))
    found_names = list(LESION_STAGES) + sorted(set(found_stages) - set(LESION_STAGES))
    width = max(len(name) for name in found_names) + 2
    lines = ["truth \\ found".ljust(18) + "".join(name.rjust(width) for name in found_names)]
    for stage in LESION_STAGES:
        lines.append(stage.ljust(18) + "".join(str(counts[(stage, name)]).rjust(width) for name in found_names))
    matches = sum(t == f for t, f in zip(truth_stages, found_stages))
    lines.append(f"{matches}/{len(truth_stages)} lesions staged as in the truth")
    return "\n".join(lines)
