"""The codes our SEG and SR use: SNOMED CT, DCM and UCUM where a code exists, else ``99SGATE``.

``99SGATE`` is StrokeGate's private coding scheme (PS3.3 8.2: a designator starting "99" is
local). Every object that uses one of its codes declares it in its Coding Scheme Identification
Sequence, and README ("Codes") lists them all, so that a reader of the SEG or SR can look them up.
There is no SNOMED CT concept for the ischaemic penumbra (hypoperfused tissue that is still
viable); "Ischemia" (52674009) would include the core, so the penumbra has a local code.
"""

from __future__ import annotations

from collections.abc import Iterable

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

LOCAL_SCHEME = "99SGATE"

INFARCT = Code("55641003", "SCT", "Infarct")
PENUMBRA = Code("PENUMBRA", LOCAL_SCHEME, "Ischemic penumbra")
FINAL_IF_REPERFUSED = Code("FINALIFREP", LOCAL_SCHEME, "Predicted final infarct if reperfused")
FINAL_IF_NOT_REPERFUSED = Code("FINALIFNOTREP", LOCAL_SCHEME, "Predicted final infarct if not reperfused")
QC_FLAG = Code("QCFLAG", LOCAL_SCHEME, "Quality control flag")
TARGET_MISMATCH = Code("TARGETMISMATCH", LOCAL_SCHEME, "DEFUSE 3 target mismatch")
NIHSS_TOTAL = Code("72089-6", "LN", "Total score [NIHSS]")
CLINICAL_INPUT = Code("CLINICALINPUT", LOCAL_SCHEME, "Clinical input used")
NIHSS_SOURCE = Code("NIHSSSOURCE", LOCAL_SCHEME, "NIHSS source")
NIHSS_ASSESSED = Code("NIHSSASSESSED", LOCAL_SCHEME, "NIHSS assessment time")
POOR_OUTCOME_90D = Code("POORMRS90D", LOCAL_SCHEME, "Probability of poor outcome (mRS 3-6) at 90 days")
OUTCOME_INPUTS = Code("OUTCOMEINPUTS", LOCAL_SCHEME, "Outcome model inputs used")

MEASUREMENT_CODES: dict[str, Code] = {
    "core_volume_ml": Code("COREVOL", LOCAL_SCHEME, "Ischemic core volume"),
    "penumbra_volume_ml": Code("PENUMBRAVOL", LOCAL_SCHEME, "Penumbra volume"),
    "hypoperfused_volume_ml": Code("HYPOPERFVOL", LOCAL_SCHEME, "Hypoperfused volume (Tmax above threshold)"),
    "mismatch_volume_ml": Code("MISMATCHVOL", LOCAL_SCHEME, "Mismatch volume (hypoperfused minus core)"),
    "mismatch_ratio": Code("MISMATCHRATIO", LOCAL_SCHEME, "Mismatch ratio (hypoperfused / core)"),
    "hypoperfusion_intensity_ratio": Code("HIR", LOCAL_SCHEME, "Hypoperfusion intensity ratio"),
    "predicted_final_reperfused_ml": Code("FINALREPVOL", LOCAL_SCHEME, "Predicted final infarct volume if reperfused"),
    "predicted_final_not_reperfused_ml": Code("FINALNOTREPVOL", LOCAL_SCHEME, "Predicted final infarct volume if not reperfused"),
    "reperfusion_salvage_ml": Code("REPSALVAGE", LOCAL_SCHEME, "Tissue reperfusion would save"),
    "scenario_dice": Code("SCENARIODICE", LOCAL_SCHEME, "Dice of the two predicted final infarcts"),
    "reperfusion_responder": Code("RESPONDER", LOCAL_SCHEME, "Likely responder to reperfusion"),
}
"""99SGATE codes (values within the 16 characters of a Code Value) of the study measurements."""

LOCAL_CODES: tuple[Code, ...] = (
    PENUMBRA, FINAL_IF_REPERFUSED, FINAL_IF_NOT_REPERFUSED, QC_FLAG, TARGET_MISMATCH, CLINICAL_INPUT, NIHSS_SOURCE, NIHSS_ASSESSED,
    POOR_OUTCOME_90D, OUTCOME_INPUTS, *MEASUREMENT_CODES.values(),
)
"""Every fixed 99SGATE code, as README lists them."""


def local_code(name: str) -> Code:
    """The 99SGATE code of a measurement: ``MEASUREMENT_CODES``, else one made from the name
    (e.g. "mismatch_ratio" -> "Mismatch ratio")."""
    if name in MEASUREMENT_CODES:
        return MEASUREMENT_CODES[name]
    return Code(name[:16], LOCAL_SCHEME, name.replace("_", " ").capitalize()[:64])


def scheme_declarations(used: Iterable[Code]) -> list[CodingSchemeIdentificationItem] | None:
    """The Coding Scheme Identification items for the local codes among ``used``, or None when none
    is local (dciodvfy warns about any declared 99-prefixed scheme, so it is declared only when used)."""
    if not any(code.scheme_designator == LOCAL_SCHEME for code in used):
        return None
    return [
        CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME,
            name="StrokeGate local codes",
            responsible_organization="StrokeGate",
        )
    ]
