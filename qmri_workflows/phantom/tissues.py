"""Tissue classes, labels and relaxation/susceptibility parameters of the MS-brain phantom.

Every voxel of the phantom is a mixture of *compartments* (volume fractions summing to at most 1;
the rest is air). Each compartment has one parameter set; several compartments may share one label
of the segmentation (e.g. the two kinds of cortical lesion).

Parameters at 3 T
-----------------
One value is chosen inside each range of ``/work/shared/reference/tissue-values.md`` (typical adult
values); rates in s^-1, PD in percent water, chi in ppm relative to CSF (water ~ -9.05 ppm absolute).

==========================  ======  ======  ======  =====  ========  ==================================
compartment                 R1      R2      R2*     PD     chi       note (T1 / T2 / T2*)
==========================  ======  ======  ======  =====  ========  ==================================
CSF                         0.24    0.57    1.0     100    0.000     T1 4170 ms, T2 1750 ms
cortical GM                 0.65    10.0    17.0    82     +0.010    T1 1540 ms, T2 100 ms, T2* 59 ms
WM                          1.05    13.3    21.0    69     -0.030    T1 950 ms, T2 75 ms, T2* 48 ms
caudate                     0.75    12.9    24.0    82     +0.070    T1 1330 ms, T2 78 ms
putamen                     0.82    14.7    30.0    80     +0.085    T1 1220 ms, T2 68 ms
globus pallidus             1.08    25.6    40.0    77     +0.200    T1 930 ms, T2 39 ms
thalamus                    0.90    13.9    21.0    78     +0.015    T1 1110 ms, T2 72 ms
skull                       3.00    60.0    500.0   8      -2.000    cortical bone + marrow (see below)
scalp                       1.10    20.0    35.0    70     +0.150    skin, muscle and ~25 % fat
==========================  ======  ======  ======  =====  ========  ==================================

Skull and scalp are not in the reference table: bone has very little MR-visible water and a T2* of
a few ms, and is about 2 ppm more diamagnetic than water (Hopkins & Wehrli 1997); the scalp's chi is
a volume mix of water-like soft tissue (0) and fat (about +0.6 ppm relative to water).

MS patient (``subject="patient"``)
----------------------------------
Directions follow Tables 1-2 of the review and the MS section of ``tissue-values.md``; lesion values
are absolute (3 T), chi offsets in brackets are relative to NAWM / normal-appearing cortex.

=====================================  =====  =====  =====  ====  =====================================
compartment                            R1     R2     R2*    PD    chi (ppm)
=====================================  =====  =====  =====  ====  =====================================
NAWM (label WM)                        1.008  12.9   19.95  71    -0.030 (as control: Table 1 NAWM)
normal-appearing cortex (cortical GM)  0.631  10.0   16.32  83    +0.010 (R1 -3 %, R2* -4 %)
caudate / putamen / globus pallidus    same   same   +10 %  same  +0.020 (iron concentration up)
thalamus                               -4 %   same   -8 %   same  -0.010 (iron and myelin loss)
early active lesion                    0.80   9.1    16.0   78    -0.0295 (+0.5 ppb, Chen 2014)
late active lesion                     0.74   8.0    14.5   81    +0.008 (+38 ppb)
chronic active lesion core             0.65   6.7    12.5   84    -0.020 (+10 ppb)
chronic active lesion rim (1.5 mm)     0.80   11.0   28.0   78    +0.040 (+70 ppb, iron rim)
chronic inactive lesion                0.62   6.25   11.0   86    -0.015 (+15 ppb, still raised)
cortical lesion (assumed values)       0.58   9.0    13.5   86    +0.030 or -0.010 (mixed, by lesion)
=====================================  =====  =====  =====  ====  =====================================

The early active lesion's R2' = R2* - R2 (6.9 s^-1) is below NAWM's (7.05 s^-1): its chi is NAWM's,
so nothing adds reversible dephasing, and edema dilutes the iron and myelin that cause it.

Cortical lesions: the review reports only that R2* is lower than in normal-appearing cortex and that
chi is heterogeneous (no R1 study exists). Every cortical-lesion value above is therefore an
assumption of this phantom, flagged in code by ``TissueParameters.assumed`` (the parameter names) and
``TissueParameters.assumption_note``: R1, R2 and PD follow the demyelination pattern of white-matter
lesions at a smaller size, and the sizes of the R2* and chi changes are chosen, not measured.

MT saturation
-------------
``TissueParameters.mtsat`` is the MT saturation of Helms et al. 2008 in percent units (p.u.): the
fraction of longitudinal magnetisation an hMRI-style MT pulse (Gaussian, 220 degrees, 4 ms, 2 kHz
off resonance, every TR of 25 ms) removes per TR at the nominal transmit field. Values at 3 T lie in
the ranges of Helms 2008, Weiskopf 2013 and Callaghan 2014 (MPM of healthy adults: white matter
about 1.4-2.0 p.u., cortex 0.7-1.0, putamen and caudate about 0.9-1.1, pallidum and thalamus higher,
CSF near 0); MS lesions have less myelin and so less MT (Lommers 2019: lesions well below NAWM, NAWM
slightly below control white matter):

========================  ======  ========================  ======
control compartment       MTsat   patient compartment       MTsat
========================  ======  ========================  ======
CSF                       0.00    NAWM                      1.62
cortical GM               0.85    normal-appearing cortex   0.83
WM                        1.70    early active lesion       1.00
caudate                   0.95    late active lesion        0.90
putamen                   1.00    chronic active core       0.80
globus pallidus           1.35    chronic active rim        1.05
thalamus                  1.15    chronic inactive lesion   0.75
skull (assumed)           0.50    cortical lesions          0.70
========================  ======  ========================  ======

Assumed (no reference value): skull 0.5 (little MR-visible water), scalp 1.2 (skin and muscle),
vein 0.2 (blood) and the cortical lesions' 0.70 (as every cortical-lesion value); the patient's
thalamus has 1.10 (its myelin loss, as its R1) and the other deep grey nuclei keep the control
values.

MTsat is a property of the protocol's MT pulse as much as of the tissue; it is kept unchanged when
the relaxation rates are scaled to another field. How the saturation changes with the transmit field
is the simulator's model (``protocol.MPMProtocol``), not the tissue's.

Atrophy of the patient
----------------------
The patient's brain is smaller where MS shrinks it, so that iron *concentration* (mean R2* or chi of a
region) and iron *content* (the region's sum, the "R2* mass" of the review) move apart as in Fig 3:

==========================  =========  ===================================================================
structure                   change     source / reasoning
==========================  =========  ===================================================================
thalamus                    -10 %      Houtchens 2007: normalised thalamic volume 16.9 % lower in MS (a
                                       mixed-duration cohort); a milder, mid-course value is chosen
caudate                     -12 %      deep grey matter loses volume fastest in MS, caudate among the
putamen                     -10 %      most affected (Eshaghi 2018: deep grey matter atrophy rates of
globus pallidus             -8 %       about 1-1.5 %/year); sizes chosen so that basal-ganglia content
                                       falls while concentration rises (R2* +10 %) in caudate and
                                       putamen, as the review reports (basal ganglia: content declines,
                                       concentration increased or stable)
cortex                      -4 %       thinner cortex: about 0.1 mm of a 2.5 mm cortex (Sailer 2003 report
                                       focal thinning of up to 1 mm); modelled below the voxel size: each
                                       voxel's cortical fraction loses 4 % to CSF
lateral ventricles          +30 %      ventricular enlargement is a robust MS finding; +30 % is a
                                       moderate value chosen for the phantom (not a cited mean)
==========================  =========  ===================================================================

Nuclei shrink by scaling their ellipsoids' semi-axes by ``(1 + change) ** (1 / 3)``; the ventricles
grow by a uniform outward shell whose thickness gives the volume change (``anatomy.py``). These sizes
are choices of the phantom inside (or, for the ventricles, of the order of) the published ranges:
they are flagged in :data:`PATIENT_ATROPHY_ASSUMED`.

Field strength
--------------
Values are tabulated at 3 T and scaled to ``field_strength`` B (tesla) with

* R1(B) = R1(3 T) (B / 3 T)^(-beta), beta = 0.38 for tissue: the power law T1 = A B0^alpha fitted by
  Rooney et al. 2007 (alpha = 0.382 for white matter, 0.376 for grey matter); beta = 0 for CSF, whose
  T1 is that of free water and nearly field-independent over 1.5-7 T.
* R2(B) = R2(3 T): transverse relaxation changes little with B0 at clinical fields (ignored).
* R2*(B) = R2 + R2'(3 T) B / 3 T: the reversible part R2' = R2* - R2 comes from static field
  inhomogeneity (iron, myelin, vessels) and scales linearly with B0 (Yablonskiy & Haacke 1994).
* PD and chi are field-independent.

References
----------
Rooney WD, Johnson G, Li X, et al. Magnetic field and tissue dependencies of human brain longitudinal
1H2O relaxation in vivo. Magn Reson Med 2007;57:308-318.

Yablonskiy DA, Haacke EM. Theory of NMR signal behavior in magnetically inhomogeneous tissues: the
static dephasing regime. Magn Reson Med 1994;32:749-763.

Chen W, Gauthier SA, Gupta A, et al. Quantitative susceptibility mapping of multiple sclerosis
lesions at various ages. Radiology 2014;271:183-192.

Hopkins JA, Wehrli FW. Magnetic susceptibility measurement of insoluble solids by NMR: magnetic
susceptibility of bone. Magn Reson Med 1997;37:494-500.

Houtchens MK, Benedict RHB, Killiany R, et al. Thalamic atrophy and cognition in multiple
sclerosis. Neurology 2007;69:1213-1223.

Eshaghi A, Prados F, Brownlee WJ, et al. Deep gray matter volume loss drives disability worsening in
multiple sclerosis. Ann Neurol 2018;83:210-222.

Sailer M, Fischl B, Salat D, et al. Focal thinning of the cerebral cortex in multiple sclerosis.
Brain 2003;126:1734-1744.

Helms G, Dathe H, Kallenberg K, Dechent P. High-resolution maps of magnetization transfer with
inherent correction for RF inhomogeneity and T1 relaxation obtained from 3D FLASH MRI. Magn Reson Med
2008;60:1396-1407.

Weiskopf N, Suckling J, Williams G, et al. Quantitative multi-parameter mapping of R1, PD*, MT, and
R2* at 3T: a multi-center validation. Front Neurosci 2013;7:95.

Callaghan MF, Freund P, Draganski B, et al. Widespread age-related differences in the human brain
microstructure revealed by quantitative magnetic resonance imaging. Neurobiol Aging 2014;35:1862-1872.

Lommers E, Simon J, Reuter G, et al. Multiparameter MRI quantification of microstructural tissue
alterations in multiple sclerosis. NeuroImage Clin 2019;23:101879.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = [
    "LABELS",
    "LABEL_ABBREVIATIONS",
    "LESION_LABELS",
    "dseg_tsv_rows",
    "TissueParameters",
    "CONTROL_TISSUES_3T",
    "PATIENT_TISSUES_3T",
    "COMPARTMENT_LABELS",
    "tissue_parameters",
    "scale_to_field",
    "DEEP_GREY_NUCLEI",
    "WM_LESIONS",
    "CORTICAL_LESIONS",
    "BRAIN_LABELS",
    "CHRONIC_ACTIVE_RIM_MM",
    "CHI_WATER_PPM",
    "CHI_AIR_PPM",
    "PATIENT_ATROPHY",
    "PATIENT_ATROPHY_ASSUMED",
    "LESION_STAGES",
    "lesion_stage",
    "AIR_CAVITIES",
    "EAR_CANALS",
    "NECK",
    "SAGITTAL_SINUS",
    "CENTRAL_VEIN_RADIUS_MM",
    "CENTRAL_VEIN_LESION_MIN_DIAMETER_MM",
]

#: Volume susceptibilities (SI, ppm) of water (CSF) and air, for the head-in-air background field.
CHI_WATER_PPM = -9.05
CHI_AIR_PPM = 0.36

#: Segmentation labels (``dseg``); names are stable and used by tests and the ``_dseg.tsv``.
LABELS: dict[int, str] = {
    0: "background",
    1: "CSF",
    2: "cortical GM",
    3: "WM",
    4: "caudate",
    5: "putamen",
    6: "globus pallidus",
    7: "thalamus",
    8: "early active lesion",
    9: "late active lesion",
    10: "chronic active lesion core",
    11: "chronic active lesion rim",
    12: "chronic inactive lesion",
    13: "cortical lesion",
    14: "skull",
    15: "scalp",
    16: "vein",
}

LABEL_ABBREVIATIONS: dict[int, str] = {
    0: "BG",
    1: "CSF",
    2: "CGM",
    3: "WM",
    4: "CAU",
    5: "PUT",
    6: "GP",
    7: "THA",
    8: "LEA",
    9: "LLA",
    10: "LCAC",
    11: "LCAR",
    12: "LCI",
    13: "CL",
    14: "SKL",
    15: "SCP",
    16: "VEIN",
}

#: Labels present only in patients.
LESION_LABELS = (8, 9, 10, 11, 12, 13)
#: Labels inside the intracranial (brain) mask: everything but background, skull and scalp.
BRAIN_LABELS = tuple(range(1, 14)) + (16,)


def dseg_tsv_rows():
    """Rows ``(index, name, abbreviation)`` of the BIDS ``_dseg.tsv`` look-up table.

    Returns
    -------
    rows : list of tuple (int, str, str)
        One row per label in :data:`LABELS`, background included, sorted by index.
    """
    return [(index, LABELS[index], LABEL_ABBREVIATIONS[index]) for index in sorted(LABELS)]


@dataclass(frozen=True)
class TissueParameters:
    """Parameters of one compartment: rates in s^-1, PD in percent water, chi in ppm (vs CSF)."""

    r1: float
    r2: float
    r2star: float
    pd: float
    chi: float
    #: MT saturation (p.u., Helms 2008) of the phantom's MT pulse at the nominal transmit field.
    mtsat: float = 0.0
    #: exponent beta of R1 ~ B0^(-beta) (Rooney 2007); 0 for free water.
    r1_field_exponent: float = 0.38
    #: Names of the parameters (``"r1"``, ``"r2"``, ``"r2star"``, ``"pd"``, ``"chi"``) whose value
    #: neither the review nor ``tissue-values.md`` reports: assumptions of this phantom.
    assumed: tuple = ()
    #: Why the assumed values were chosen.
    assumption_note: str = ""


#: Compartment -> label. Two cortical-lesion compartments carry the heterogeneous chi of Table 2.
COMPARTMENT_LABELS: dict[str, int] = {
    "csf": 1,
    "cortical_gm": 2,
    "wm": 3,
    "caudate": 4,
    "putamen": 5,
    "globus_pallidus": 6,
    "thalamus": 7,
    "early_active": 8,
    "late_active": 9,
    "chronic_active_core": 10,
    "chronic_active_rim": 11,
    "chronic_inactive": 12,
    "cortical_lesion_para": 13,
    "cortical_lesion_dia": 13,
    "skull": 14,
    "scalp": 15,
    "vein": 16,
}

_T = TissueParameters

CONTROL_TISSUES_3T: dict[str, TissueParameters] = {
    "csf": _T(0.24, 0.57, 1.0, 100.0, 0.000, r1_field_exponent=0.0),
    "cortical_gm": _T(0.65, 10.0, 17.0, 82.0, 0.010),
    "wm": _T(1.05, 13.3, 21.0, 69.0, -0.030),
    "caudate": _T(0.75, 12.9, 24.0, 82.0, 0.070),
    "putamen": _T(0.82, 14.7, 30.0, 80.0, 0.085),
    "globus_pallidus": _T(1.08, 25.6, 40.0, 77.0, 0.200),
    "thalamus": _T(0.90, 13.9, 21.0, 78.0, 0.015),
    "skull": _T(3.00, 60.0, 500.0, 8.0, -2.000),
    "scalp": _T(1.10, 20.0, 35.0, 70.0, 0.150),
    # Venous blood (Hct 0.42, Y 0.6): chi = Hct (1 - Y) 4 pi 0.27 ppm (deoxyhaemoglobin) - ~0.17 ppm
    # (oxygenated blood below water) ~ +0.40 ppm vs water; T1 1.6 s, T2 ~50 ms, T2* ~20 ms at 3 T.
    "vein": _T(0.62, 20.0, 50.0, 85.0, 0.400),
}

_CONTROL_MTSAT = {
    "csf": 0.0,
    "cortical_gm": 0.85,
    "wm": 1.70,
    "caudate": 0.95,
    "putamen": 1.00,
    "globus_pallidus": 1.35,
    "thalamus": 1.15,
    "skull": 0.5,  # assumed: little MR-visible water, as the PD
    "scalp": 1.2,  # assumed: skin and muscle have MT close to white matter's
    "vein": 0.2,  # assumed: blood has little macromolecular MT
}
CONTROL_TISSUES_3T = {name: replace(values, mtsat=_CONTROL_MTSAT[name]) for name, values in CONTROL_TISSUES_3T.items()}

_control = CONTROL_TISSUES_3T
_CORTICAL_LESION_ASSUMED = ("r1", "r2", "r2star", "pd", "chi")
_CORTICAL_LESION_NOTE = (
    "The review (Table 2) gives only directions for cortical lesions: R2* lower than normal-appearing "
    "cortex, chi decreased or increased. R1 (-8 %), R2 (-10 %) and PD (+3 points) follow the "
    "demyelination pattern of white-matter lesions at a smaller size; the R2* (-17 %) and chi "
    "(+20 / -20 ppb) sizes are assumed."
)
PATIENT_TISSUES_3T: dict[str, TissueParameters] = {
    **CONTROL_TISSUES_3T,
    # NAWM: R1, R2 a few % lower, PD higher, R2* lower, chi as in controls (Table 1, NAWM row).
    "wm": _T(1.008, 12.9, 19.95, 71.0, -0.030),
    # Normal-appearing cortex: R1 and R2* lower (Table 2).
    "cortical_gm": _T(0.631, 10.0, 16.32, 83.0, 0.010),
    # Basal ganglia: higher iron concentration -> R2* and chi up (Table 2).
    "caudate": replace(_control["caudate"], r2star=26.4, chi=0.090),
    "putamen": replace(_control["putamen"], r2star=33.0, chi=0.105),
    "globus_pallidus": replace(_control["globus_pallidus"], r2star=44.0, chi=0.220),
    # Thalamus: iron and myelin loss -> R1, R2* and chi down (Table 2).
    "thalamus": replace(_control["thalamus"], r1=0.864, r2star=19.32, chi=0.005),
    # White-matter lesion stages (Table 1). Early active: R2* down by more than R2, so that its
    # reversible part R2' = R2* - R2 (6.9 s^-1) stays below NAWM's (7.05 s^-1): edema dilutes the
    # iron and myelin that cause R2', and its chi equals NAWM's (+0.5 ppb, Chen 2014).
    "early_active": _T(0.80, 9.1, 16.0, 78.0, -0.0295),
    "late_active": _T(0.74, 8.0, 14.5, 81.0, 0.008),
    "chronic_active_core": _T(0.65, 6.7, 12.5, 84.0, -0.020),
    "chronic_active_rim": _T(0.80, 11.0, 28.0, 78.0, 0.040),
    "chronic_inactive": _T(0.62, 6.25, 11.0, 86.0, -0.015),
    # Cortical lesions: R2* down; chi heterogeneous (Table 2): paramagnetic and diamagnetic kinds.
    # The review reports only these directions ("no studies have investigated R1 changes in CL");
    # R1, R2, PD and the sizes of the R2* and chi changes are assumptions (flagged below).
    "cortical_lesion_para": _T(
        0.58, 9.0, 13.5, 86.0, 0.030, assumed=_CORTICAL_LESION_ASSUMED, assumption_note=_CORTICAL_LESION_NOTE
    ),
    "cortical_lesion_dia": _T(
        0.58, 9.0, 13.5, 86.0, -0.010, assumed=_CORTICAL_LESION_ASSUMED, assumption_note=_CORTICAL_LESION_NOTE
    ),
}
_PATIENT_MTSAT = {
    "wm": 1.62,  # NAWM
    "cortical_gm": 0.83,
    "thalamus": 1.10,  # myelin loss, as its R1
    "early_active": 1.00,
    "late_active": 0.90,
    "chronic_active_core": 0.80,
    "chronic_active_rim": 1.05,
    "chronic_inactive": 0.75,
    "cortical_lesion_para": 0.70,  # assumed, as every cortical-lesion value
    "cortical_lesion_dia": 0.70,
}
PATIENT_TISSUES_3T = {
    name: replace(values, mtsat=_PATIENT_MTSAT.get(name, values.mtsat)) for name, values in PATIENT_TISSUES_3T.items()
}
del _control, _T


def scale_to_field(parameters, field_strength):
    """Scale 3 T parameters to another main field (see the module notes for the laws).

    Parameters
    ----------
    parameters : TissueParameters
        Values at 3 T.
    field_strength : float
        Main field in tesla (> 0).

    Returns
    -------
    TissueParameters
        R1 scaled by ``(B / 3)^-beta``, R2 kept, R2* = R2 + R2'(3 T) B / 3, PD and chi kept.
    """
    if not field_strength > 0:
        raise ValueError(f"field_strength must be positive (tesla), got {field_strength!r}")
    ratio = field_strength / 3.0
    r2_prime = parameters.r2star - parameters.r2
    return replace(
        parameters, r1=parameters.r1 * ratio ** (-parameters.r1_field_exponent), r2star=parameters.r2 + r2_prime * ratio
    )


def tissue_parameters(subject="patient", field_strength=3.0):
    """Parameters of every compartment for a subject type and field strength.

    Parameters
    ----------
    subject : {"patient", "control"}
    field_strength : float
        Tesla.

    Returns
    -------
    dict of str -> TissueParameters
        Keys of :data:`COMPARTMENT_LABELS` (lesion compartments only for patients).
    """
    if subject == "patient":
        table = PATIENT_TISSUES_3T
    elif subject == "control":
        table = CONTROL_TISSUES_3T
    else:
        raise ValueError(f"subject must be 'patient' or 'control', got {subject!r}")
    return {name: scale_to_field(values, field_strength) for name, values in table.items()}


#: Deep grey-matter nuclei as ellipsoids in MNI152 mm: (compartment, centre (x, y, z), semi-axes).
#: Centres are approximately the centroids of the Harvard-Oxford subcortical atlas structures
#: (FSL, 25 % threshold) rounded to whole mm, with x mirrored for the symmetric 2009a template;
#: semi-axes (x, y, z) approximate each nucleus's extent on the MNI152 2009a template (caudate:
#: head and body only). Listed in order of precedence where ellipsoids overlap (the pallidum takes
#: the medial part of the putamen's ellipsoid).
DEEP_GREY_NUCLEI = (
    ("globus_pallidus", (19.0, -4.0, -1.0), (4.0, 8.0, 5.0)),
    ("globus_pallidus", (-19.0, -4.0, -1.0), (4.0, 8.0, 5.0)),
    ("putamen", (25.0, 1.0, 0.0), (6.0, 15.0, 9.0)),
    ("putamen", (-25.0, 1.0, 0.0), (6.0, 15.0, 9.0)),
    ("thalamus", (11.0, -18.0, 7.0), (8.0, 14.0, 9.0)),
    ("thalamus", (-11.0, -18.0, 7.0), (8.0, 14.0, 9.0)),
    ("caudate", (13.0, 10.0, 10.0), (5.0, 13.0, 8.0)),
    ("caudate", (-13.0, 10.0, 10.0), (5.0, 13.0, 8.0)),
)

#: White-matter lesions of the patient: (compartment, diameter in mm). The 10 mm lesion of every
#: stage keeps at least one voxel of its label at 4 mm resolution (a 5 mm radius covers the nearest
#: 4 mm voxel centre, at most 3.5 mm away, with more than half its volume).
WM_LESIONS = (
    ("early_active", 10.0),
    ("early_active", 6.0),
    ("early_active", 4.0),
    ("late_active", 10.0),
    ("late_active", 7.0),
    ("late_active", 4.0),
    ("chronic_active", 10.0),
    ("chronic_active", 8.0),
    ("chronic_inactive", 10.0),
    ("chronic_inactive", 7.0),
    ("chronic_inactive", 5.0),
    ("chronic_inactive", 3.0),
)

#: Cortical lesions, intracortical (they replace cortical GM inside the sphere):
#: (compartment, diameter in mm).
CORTICAL_LESIONS = (
    ("cortical_lesion_para", 6.0),
    ("cortical_lesion_dia", 5.0),
    ("cortical_lesion_para", 4.0),
)

#: Thickness of the paramagnetic rim of chronic active lesions (mm).
CHRONIC_ACTIVE_RIM_MM = 1.5


#: Relative volume change of the patient's structures (module notes, "Atrophy of the patient"):
#: deep grey nuclei (compartment names), ``"cortex"`` and ``"ventricles"``.
PATIENT_ATROPHY = {
    "thalamus": -0.10,
    "caudate": -0.12,
    "putamen": -0.10,
    "globus_pallidus": -0.08,
    "cortex": -0.04,
    "ventricles": +0.30,
}
#: Sizes of :data:`PATIENT_ATROPHY` that are choices of the phantom rather than measured means.
PATIENT_ATROPHY_ASSUMED = ("caudate", "putamen", "globus_pallidus", "ventricles")

#: Stage names of Table 1-2 of the review, as written in the lesion truth and the lesion tables.
LESION_STAGES = ("early active", "late active", "chronic active", "chronic inactive", "cortical")


def lesion_stage(compartment):
    """Stage name (:data:`LESION_STAGES`) of a lesion compartment of :data:`WM_LESIONS` or
    :data:`CORTICAL_LESIONS` (``"chronic_active"`` covers its core and rim)."""
    if compartment.startswith("cortical"):
        return "cortical"
    stage = compartment.replace("_core", "").replace("_rim", "").replace("_", " ")
    if stage not in LESION_STAGES:
        raise ValueError(f"unknown lesion compartment {compartment!r}")
    return stage


#: Air cavities of the skull as ellipsoids in MNI152 mm: (name, centre, semi-axes). Placed where a
#: head has them on the symmetric 2009a template; the anatomy keeps a 1.5 mm bone wall between any
#: cavity and the brain. Air is +9.4 ppm relative to tissue: the strongest background sources.
AIR_CAVITIES = (
    ("frontal sinus", (0.0, 74.0, 8.0), (13.0, 4.5, 10.0)),
    ("sphenoid sinus", (0.0, 8.0, -34.0), (12.0, 11.0, 9.0)),
    ("mastoid air cells", (48.0, -38.0, -38.0), (8.0, 10.0, 9.0)),
    ("mastoid air cells", (-48.0, -38.0, -38.0), (8.0, 10.0, 9.0)),
)
#: External ear canals: tubes along x from ``|x| = inner`` out of the head: ((inner, outer) |x| in
#: mm, y, z, radius), both sides.
EAR_CANALS = ((58.0, 100.0), -22.0, -42.0, 4.0)
#: Neck below the skull base: ((centre x, centre y), (semi-axis x, semi-axis y), top z), MNI mm;
#: soft tissue that continues below the grid.
NECK = ((0.0, -20.0), (48.0, 52.0), -45.0)
#: Superior sagittal sinus: (depth of its axis inside the intracranial surface, radius, (front y,
#: back y), lowest z), mm; it follows the midline surface from the frontal lobe to the occiput.
SAGITTAL_SINUS = (4.5, 3.5, (55.0, -105.0), -5.0)
#: Radius (mm) of the central (medullary) vein of a chronic white-matter lesion, and the smallest
#: lesion diameter (mm) that gets one (the central vein sign).
CENTRAL_VEIN_RADIUS_MM = 0.5
CENTRAL_VEIN_LESION_MIN_DIAMETER_MM = 8.0
