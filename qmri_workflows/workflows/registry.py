"""The map registry: one declarative entry per family of maps.

A :class:`MapFamily` says what a family of maps needs (input collections, other families), how to
build its workflow, what it writes and which command-line options it takes. The subject workflow
(:func:`qmri_workflows.workflows.base.init_single_subject_wf`), the plan printed at start, the
derivative sinks and the command line are all generated from these entries, so adding a map is
adding an entry, a core module, an interface and a factory, and nothing else.

Built-in entries live next to their factories, as a module-level ``MAP_FAMILIES`` tuple in any module
of :mod:`qmri_workflows.workflows`; they are found by :func:`registered_families`. Code outside the
package (a lab pipeline, a test) adds its own with :func:`register`.

The contract of a family's workflow (returned by :attr:`MapFamily.build`):

* an ``inputnode`` with one field per key of :attr:`MapFamily.consumes` (outputs of other
  families, connected by the subject workflow) and of :attr:`MapFamily.derived_inputs` (files
  given with ``--derivatives``, resampled onto the map grid first); everything known when the
  graph is built (raw file names, echo times ...) the factory sets itself from ``inputs``;
* an ``outputnode`` with the fields named by the family's :class:`Output` entries, and a
  ``metadata`` field (dict of sidecar fields computed at run time) when
  :attr:`MapFamily.runtime_metadata` is true.

Families that analyse maps (regional and lesion statistics) do not name the families they read: an
:class:`Output` flagged ``quantitative`` is a calibrated map, and a family with
:attr:`MapFamily.consumes_maps` receives every such output of the families that run for the subject
(``inputnode.map_files`` and, set when the graph is built, ``inputnode.map_names``: the outputs'
suffixes, with ``desc`` when there is one). A new map family flags its maps and they flow in.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

__all__ = [
    "BuildContext",
    "MapFamily",
    "MapPlan",
    "Option",
    "Output",
    "clear_registered",
    "has_maps_to_compute",
    "plan_families",
    "positive_int",
    "quantitative_outputs",
    "register",
    "superseded_sources",
    "registered_families",
    "unregister",
]


def positive_int(text):
    """argparse type of a whole number of 1 or more."""
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


@dataclass(frozen=True)
class Option:
    """A command-line option of a family, as ``argparse.ArgumentParser.add_argument`` takes it.

    ``dest`` is the key under which the value reaches :attr:`BuildContext.options`.
    """

    flags: tuple
    dest: str
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Output:
    """One derivative file a family writes.

    Attributes
    ----------
    field : str
        Field of the family's ``outputnode`` holding the file (or a list of files, see ``index``).
    suffix : str
        BIDS suffix (``R2starmap``, ``mask`` ...).
    desc : str, optional
        ``desc-`` entity.
    index : int, optional
        Position in the list the field holds, when the family writes one file per item (one S0 map
        per flip angle, say); None when the field holds one file.
    source_files : tuple of str
        Raw files the output derives from (``Sources``); the first one also gives the subject and
        session entities of the output's name.
    metadata : dict
        Sidecar fields known when the graph is built; they win over the run-time ``metadata``.
    datatype : str, optional
        ``anat`` or ``fmap``; by default ``fmap`` for TB1map/RB1map and ``anat`` otherwise.
    quantitative : bool
        A calibrated map (R1, R2*, chi ...) that analysis families read (module notes); not for
        uncertainties, intercepts or masks.
    """

    field: str
    suffix: str
    source_files: tuple
    desc: str | None = None
    index: int | None = None
    metadata: dict = field(default_factory=dict)
    datatype: str | None = None
    quantitative: bool = False

    @property
    def map_name(self):
        """Name of the map in analysis tables: the suffix, with ``desc`` when there is one."""
        return self.suffix if not self.desc else f"{self.suffix}_desc-{self.desc}"


@dataclass(frozen=True)
class BuildContext:
    """What a family's factory receives.

    Attributes
    ----------
    inputs : qmri_workflows.io.query.SubjectInputs
        The subject's collections.
    options : dict
        Values of every registered family's options (by ``dest``), defaults filled in.
    omp_nthreads : int
        Threads one voxel-wise node may use (its ``n_procs``).
    running : frozenset of str
        Keys of the families that run for this subject, so a factory can tell whether an optional
        provider (:attr:`MapFamily.uses`) feeds it.
    """

    inputs: object
    options: dict
    omp_nthreads: int = 1
    running: frozenset = frozenset()


@dataclass(frozen=True)
class MapFamily:
    """One registry entry.

    Attributes
    ----------
    key : str
        Identifier (alphanumeric and ``_``) used in node names and in ``consumes``.
    name : str
        Name printed in the plan (``R2*``, ``R1``, ``brain mask``).
    needs : tuple of str
        Input collections that must all be usable (names from :mod:`qmri_workflows.io.query`).
    reads : tuple of str
        Input collections the family uses when present without requiring them (B1+ takes an AFI
        pair or a TB1map; its ``check`` decides), so the App does not call them unused.
    depends : tuple of str
        Keys of families whose outputs this one consumes; it runs only when they run.
    uses : tuple of str
        Keys of families whose outputs this one consumes when they run (R1 takes the B1+ map when
        there is one); it runs without them, and the ``consumes`` fields they would feed are then
        left undefined (the factory sees which run in :attr:`BuildContext.running`).
    check : callable, optional
        ``check(inputs) -> str or None``: a reason the data cannot support the family even though
        the collections exist (too few echoes, say), or None. With ``check_options`` true it is
        ``check(inputs, options)`` (the option values by ``dest``, defaults filled in), for a
        family whose needs depend on a chosen method (R2 from bSSFP: complex data or not).
    describe : callable
        ``describe(inputs) -> str``: what the family will be computed from (for the plan).
    build : callable
        ``build(context: BuildContext) -> nipype Workflow`` (contract in the module notes).
    outputs : callable
        ``outputs(inputs) -> list of Output``.
    consumes : dict
        ``{inputnode field: (family key, outputnode field)}``.
    derived_inputs : dict
        ``{inputnode field: (collection, interpolation)}``: files given with ``--derivatives``
        (:data:`qmri_workflows.io.query.TB1MAP` ...), brought onto the map grid with
        ``interpolation`` (``"linear"`` for smooth fields, ``"nearest"``/``"majority"`` for labels)
        before they reach the family. Optional: the field is left undefined when the subject has
        no such file.
    uses_derived : callable or None
        ``uses_derived(inputs) -> bool``: whether the family's build reads its ``derived_inputs``
        for this subject (a raw AFI pair wins over a pre-computed TB1map of the raw dataset); None:
        whenever they exist.
    options : tuple of Option
        Command-line options of the family.
    runtime_metadata : bool
        Whether the family's ``outputnode`` has a ``metadata`` field.
    check_options : bool
        Whether ``check`` takes the option values as its second argument.
    describe_options : bool
        Whether ``describe`` takes the option values as its second argument (a plan line that says
        which corrections the options turn off).
    outputs_options : bool
        Whether ``outputs`` takes the option values as its second argument (outputs whose
        ``Sources`` depend on an option: PD without receive correction does not read the RB1COR
        pair). It must also accept being called with ``inputs`` alone (the fields and suffixes may
        not depend on the options).
    supersedes : dict
        ``{(family key, outputnode field): own outputnode field}``: outputs of a family this one
        depends on and refines (R2 refits R1 with each voxel's own T2). When this family runs, the
        derivatives writer and every other family take this family's field instead, so the
        refined map is the one published and used; families that consume a superseded output run
        after this one (unless this one needs them).
    auxiliary : bool
        The family serves others (the brain mask): a subject for which only auxiliary families can
        run has no map to compute.
    consumes_maps : bool
        The family reads every ``quantitative`` output of the families that run (module notes); it
        runs after them, and only when there is at least one.
    """

    key: str
    name: str
    build: Callable
    outputs: Callable
    describe: Callable
    needs: tuple = ()
    reads: tuple = ()
    depends: tuple = ()
    uses: tuple = ()
    check: Callable | None = None
    consumes: dict = field(default_factory=dict)
    derived_inputs: dict = field(default_factory=dict)
    uses_derived: Callable | None = None
    options: tuple = ()
    runtime_metadata: bool = True
    auxiliary: bool = False
    consumes_maps: bool = False
    check_options: bool = False
    describe_options: bool = False
    outputs_options: bool = False
    supersedes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MapPlan:
    """Whether a family runs for a subject, and why (not)."""

    name: str
    run: bool
    reason: str
    key: str = ""
    auxiliary: bool = False

    def __str__(self):
        return f"{self.name}: {'yes' if self.run else 'no'}, {self.reason}"


_ADDED: dict = {}


def register(family):
    """Add ``family`` to the registry (replacing an entry with the same key); return it."""
    if not family.key.replace("_", "").isalnum():
        raise ValueError(f"map family key {family.key!r} must be alphanumeric (and '_')")
    _ADDED[family.key] = family
    return family


def unregister(key):
    """Remove a family added with :func:`register` (no error if absent)."""
    _ADDED.pop(key, None)


def clear_registered():
    """Remove every family added with :func:`register`."""
    _ADDED.clear()


def _builtin_families():
    from .. import workflows

    found = {}
    for module_info in pkgutil.iter_modules(workflows.__path__):
        module = importlib.import_module(f"{workflows.__name__}.{module_info.name}")
        for family in getattr(module, "MAP_FAMILIES", ()):
            found[family.key] = family
    return found


def registered_families():
    """Every family (built-in and registered), dependencies before dependents.

    Raises
    ------
    ValueError
        If a family depends on an unknown family, or dependencies form a cycle.
    """
    families = {**_builtin_families(), **_ADDED}
    ordered, state = [], {}
    refiners = _refiners(families)

    def visit(key, chain):
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            raise ValueError(f"map families depend on each other in a cycle: {' -> '.join(chain + [key])}")
        if key not in families:
            raise ValueError(f"map family {chain[-1]!r} depends on unknown family {key!r}")
        state[key] = "visiting"
        for dependency in (*families[key].depends, *families[key].uses, *refiners.get(key, ())):
            visit(dependency, chain + [key])
        state[key] = "done"
        ordered.append(families[key])

    for key in sorted(families):
        visit(key, [])
    # families that read every quantitative map run after all the others
    return [f for f in ordered if not f.consumes_maps] + [f for f in ordered if f.consumes_maps]


def _ancestors(families, key):
    """Keys of the families ``key`` needs, directly or not (``depends`` and ``uses``)."""
    found, stack = set(), [key]
    while stack:
        family = families.get(stack.pop())
        for dependency in (*family.depends, *family.uses) if family else ():
            if dependency not in found:
                found.add(dependency)
                stack.append(dependency)
    return found


def _refiners(families):
    """``{family key: keys of the families that supersede an output it consumes}`` (to run first)."""
    refiners = {}
    for refiner in families.values():
        superseded = set(refiner.supersedes)
        if not superseded:
            continue
        ancestors = _ancestors(families, refiner.key)
        for family in families.values():
            if family.key == refiner.key or family.key in ancestors:
                continue
            consumed = set(family.consumes.values())
            if family.consumes_maps or consumed & superseded:
                refiners.setdefault(family.key, []).append(refiner.key)
    return refiners


def superseded_sources(families):
    """``{(family key, field): (refining family key, its field)}`` among ``families`` (those that run)."""
    return {source: (family.key, own_field) for family in families for source, own_field in family.supersedes.items()}


def quantitative_outputs(family, inputs):
    """The ``quantitative`` outputs of ``family`` for a subject (single files only)."""
    return [output for output in family.outputs(inputs) if output.quantitative and output.index is None]


def plan_families(inputs, families=None, options=None):
    """Decide, family by family, what the subject's data support.

    Parameters
    ----------
    inputs : qmri_workflows.io.query.SubjectInputs
    families : list of MapFamily, optional
        In dependency order; :func:`registered_families` by default.
    options : dict, optional
        Option values by ``dest`` (for the checks with ``check_options``); missing ones take
        their defaults.

    Returns
    -------
    list of MapPlan
        One per family, in dependency order.
    """
    families = registered_families() if families is None else families
    options = {
        **{option.dest: option.kwargs.get("default") for family in families for option in family.options},
        **(options or {}),
    }
    plans, running = [], {}
    names = {family.key: family.name for family in families}
    for family in families:
        reason = None
        for collection in family.needs:
            if not inputs.has(collection):
                problem = inputs.problem(collection)
                reason = f"{collection} unusable: {problem.message}" if problem else f"no {collection} data"
                break
        if reason is None:
            for dependency in family.depends:
                if not running.get(dependency, False):
                    reason = f"needs {names.get(dependency, dependency)}, which is not computed"
                    break
        if reason is None and family.consumes_maps:
            producers = [other for other in families if running.get(other.key) and quantitative_outputs(other, inputs)]
            if not producers:
                reason = "no quantitative map is computed"
        if reason is None and family.check is not None:
            reason = family.check(inputs, options) if family.check_options else family.check(inputs)
        run = reason is None
        running[family.key] = run
        if run:
            reason = family.describe(inputs, options) if family.describe_options else family.describe(inputs)
        plans.append(MapPlan(family.name, run, reason, family.key, family.auxiliary))
    return plans


def has_maps_to_compute(plans):
    """Whether any family that is not auxiliary runs (see :attr:`MapFamily.auxiliary`)."""
    return any(plan.run and not plan.auxiliary for plan in plans)
