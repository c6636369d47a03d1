"""Clinical variables of a synthetic patient and the documented model of their 90-day outcome.

NIHSS rises with the hypoperfused and core volumes and with a dominant (left) hemisphere lesion.
The 90-day modified Rankin Scale follows a proportional-odds logistic model:

    eta = -1.6 + 0.05 (age - 70) + 0.12 NIHSS + 0.015 V_final + 2.0 ICH - 0.8 reperfused
    P(mRS >= k) = sigmoid(eta - theta_k),  theta = (-3.0, -1.5, 0.0, 1.2, 2.4, 3.4) for k = 1..6

so P(mRS 3-6) = sigmoid(eta); V_final (mL) is the final infarct for the patient's actual
reperfusion status. The true probability is kept, so an outcome model's AUC can be compared with
the best achievable one on the same cohort.

Reperfusion (TICI) and sICH happen after admission, so no admission-time model can know them. The
admission probability integrates them out of the model above (``admission_probability``): the
mean of sigmoid(eta) over reperfused / not (P = 0.75 for a stroke, from the TICI grades) and sICH /
not (its own logistic model in the core volume). Its AUC on a cohort is the admission ceiling
(``admission_ceiling``), the honest upper bound for an outcome model fed at admission.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

OUTCOME_COEFFICIENTS = {
    "intercept": -1.6,
    "age_per_year_over_70": 0.05,
    "nihss_per_point": 0.12,
    "final_infarct_per_ml": 0.015,
    "sich": 2.0,
    "reperfused": -0.8,
}
MRS_CUTPOINTS = (-3.0, -1.5, 0.0, 1.2, 2.4, 3.4)  # theta_k for mRS >= 1 .. mRS >= 6
TICI_GRADES = ("0", "1", "2a", "2b", "2c", "3")
TICI_PROBABILITIES = (0.10, 0.05, 0.10, 0.30, 0.15, 0.30)
REPERFUSED_GRADES = frozenset({"2b", "2c", "3"})


@dataclass(frozen=True)
class Clinical:
    """The EHR-style record of one synthetic patient (volumes are whole-brain, mL)."""

    age: int
    sex: str  # "F" | "M"
    nihss: int
    onset_to_imaging_min: int
    lesion_side: str
    tici: str | None  # None when there is no occlusion
    reperfused: bool
    sich: bool  # symptomatic intracranial haemorrhage
    core_ml: float
    hypoperfused_ml: float
    final_infarct_ml: float
    p_poor_outcome: float  # true P(mRS 3-6) under the model above
    mrs_90d: int
    p_poor_outcome_admission: float  # P(mRS 3-6) from what is known at admission (TICI, sICH integrated out)

    def as_dict(self) -> dict:
        return asdict(self)


def sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-x))


def draw_clinical(rng: np.random.Generator, volumes_ml: dict[str, float], side: str) -> Clinical:
    """Draw age, sex, NIHSS, timing, reperfusion, sICH and the 90-day mRS for one patient."""
    core, hypo = volumes_ml["core"], volumes_ml["hypoperfused"]
    stroke = hypo > 0
    age = int(np.clip(round(rng.normal(70, 12)), 25, 98))
    sex = "F" if rng.random() < 0.5 else "M"
    if stroke:
        mean = 1.5 + 0.07 * hypo + 0.06 * core + (3.0 if side == "left" else 0.0)
        nihss = int(np.clip(round(mean + rng.normal(0, 2.5)), 1, 42))
        tici = str(rng.choice(TICI_GRADES, p=TICI_PROBABILITIES))
    else:
        nihss = int(np.clip(rng.poisson(1.5), 0, 42))  # mimic or transient symptoms
        tici = None
    reperfused = tici is None or tici in REPERFUSED_GRADES
    final = volumes_ml["final_reperfused" if reperfused else "final_not_reperfused"]
    sich = bool(stroke and rng.random() < sich_probability(core, reperfused))
    eta = outcome_logit(age, nihss, final, sich, reperfused)
    latent = eta + rng.logistic()
    mrs = int(np.sum(latent > np.asarray(MRS_CUTPOINTS)))
    return Clinical(
        age=age,
        sex=sex,
        nihss=nihss,
        onset_to_imaging_min=int(np.clip(round(rng.lognormal(np.log(150), 0.6)), 30, 1440)),
        lesion_side=side if stroke else "none",
        tici=tici,
        reperfused=reperfused,
        sich=sich,
        core_ml=round(core, 1),
        hypoperfused_ml=round(hypo, 1),
        final_infarct_ml=round(final, 1),
        p_poor_outcome=float(sigmoid(eta)),
        mrs_90d=mrs,
        p_poor_outcome_admission=admission_probability(age, nihss, volumes_ml),
    )


REPERFUSION_PROBABILITY = float(sum(p for g, p in zip(TICI_GRADES, TICI_PROBABILITIES, strict=True) if g in REPERFUSED_GRADES))
"""P(TICI 2b-3) for a patient with an occlusion."""


def sich_probability(core_ml: float, reperfused: bool) -> float:
    """P(symptomatic intracranial haemorrhage) of a stroke patient."""
    return float(sigmoid(-4.5 + 0.015 * core_ml + 0.5 * reperfused))


def admission_probability(age: float, nihss: float, volumes_ml: dict[str, float]) -> float:
    """P(mRS 3-6) given what is known at admission (age, NIHSS, the lesion's zone volumes), with
    reperfusion and sICH integrated out of the outcome model: the best prediction any model fed
    at admission can make for this patient."""
    if volumes_ml["hypoperfused"] <= 0:  # no occlusion: reperfused by definition, no sICH, no infarct
        return float(sigmoid(outcome_logit(age, nihss, volumes_ml.get("final_reperfused", 0.0), False, True)))
    total = 0.0
    for reperfused, p_reperfused in ((True, REPERFUSION_PROBABILITY), (False, 1.0 - REPERFUSION_PROBABILITY)):
        final = volumes_ml["final_reperfused" if reperfused else "final_not_reperfused"]
        p_sich = sich_probability(volumes_ml["core"], reperfused)
        for sich, p in ((True, p_sich), (False, 1.0 - p_sich)):
            total += p_reperfused * p * float(sigmoid(outcome_logit(age, nihss, final, sich, reperfused)))
    return total


def admission_ceiling(records: list[Clinical]) -> float:
    """AUC for mRS 3-6 of the admission probability on these patients: the ceiling of any
    admission-time outcome model on the same cohort (NaN unless both outcomes occur)."""
    return roc_auc(np.array([r.p_poor_outcome_admission for r in records]), np.array([r.mrs_90d >= 3 for r in records]))


def outcome_logit(age: float, nihss: float, final_ml: float, sich: bool, reperfused: bool) -> float:
    """Linear predictor eta of the outcome model; P(mRS 3-6) = sigmoid(eta)."""
    c = OUTCOME_COEFFICIENTS
    return float(
        c["intercept"]
        + c["age_per_year_over_70"] * (age - 70)
        + c["nihss_per_point"] * nihss
        + c["final_infarct_per_ml"] * final_ml
        + c["sich"] * sich
        + c["reperfused"] * reperfused
    )


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with midranks); NaN unless both classes occur."""
    from scipy.stats import rankdata

    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
