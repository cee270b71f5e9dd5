"""Small utility interfaces for the workflows."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..io.staging import commit_staged_files


class _MergeMetadataInputSpec(BaseInterfaceInputSpec):
    base = traits.Dict(mandatory=True, desc="fields computed by a node (e.g. EstimationAlgorithm)")
    update = traits.Dict(mandatory=True, desc="fields that win over base (e.g. one flip angle's)")
    base_wins = traits.List(traits.Str, desc="keys whose base value is kept even when update has them")


class _MergeMetadataOutputSpec(TraitedSpec):
    out_dict = traits.Dict(desc="merged dictionary")


class MergeMetadata(SimpleInterface):
    """Merge sidecar dictionaries: a node's computed fields, updated by fields known at build time."""

    input_spec = _MergeMetadataInputSpec
    output_spec = _MergeMetadataOutputSpec

    def _run_interface(self, runtime):
        merged = {**self.inputs.base, **self.inputs.update}
        for key in self.inputs.base_wins if isdefined(self.inputs.base_wins) else ():
            if key in self.inputs.base:
                merged[key] = self.inputs.base[key]
        self._results["out_dict"] = merged
        return runtime


class _CommitDerivativesInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True, desc="staged files")
    staging_dir = Directory(mandatory=True, desc="staging folder the files are in")
    output_dir = Directory(mandatory=True, desc="derivatives dataset root")


class _CommitDerivativesOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True), desc="published files")


class CommitDerivatives(SimpleInterface):
    """Publish a subject's staged derivatives in one step (see :mod:`qmri_workflows.io.staging`)."""

    input_spec = _CommitDerivativesInputSpec
    output_spec = _CommitDerivativesOutputSpec

    def _run_interface(self, runtime):
        self._results["out_files"] = commit_staged_files(
            self.inputs.staging_dir, self.inputs.output_dir, self.inputs.in_files
        )
        return runtime


class _PickItemInputSpec(BaseInterfaceInputSpec):
    # A one-item list may arrive as the item itself (OutputMultiObject unwraps it).
    inlist = InputMultiObject(traits.Any, mandatory=True, desc="items (e.g. one file per flip angle)")
    index = traits.Int(mandatory=True, desc="position of the item to pass on")


class _PickItemOutputSpec(TraitedSpec):
    out = traits.Any(desc="the item at index")


class PickItem(SimpleInterface):
    """Pass on one item of a list (one of a family's per-flip-angle maps to its own sink)."""

    input_spec = _PickItemInputSpec
    output_spec = _PickItemOutputSpec

    def _run_interface(self, runtime):
        items = self.inputs.inlist
        if not -len(items) <= self.inputs.index < len(items):
            raise IndexError(f"item {self.inputs.index} requested from a list of {len(items)}")
        self._results["out"] = items[self.inputs.index]
        return runtime
