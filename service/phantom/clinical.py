"""Clinical variables of a synthetic patient and the documented model of their 90-day outcome.

NIHSS rises with the hypoperfused and core volumes and with a dominant (left) hemisphere lesion.
The 90-day modified Rankin Scale follows a proportional-odds logistic model:

    eta = -1.6 + 0.05 (age - 70) + 0.12 NIHSS + 0.015 V_final + 2.0 ICH - 0.8 reperfused
    P(mRS >= k) = sigmoid(eta - theta_k),  theta = (-3.0, -1.5, 0.0, 1.2, 2.4, 3.4) for k = 1..6

so P(mRS 3-6) = sigmoid(eta); V_final (mL) is the final infarct for the patient's actual
reperfusion status. The true probability is kept, so an outcome model's AUC can be compared with
the best achievable one on the same cohort.
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
    sich = bool(stroke and rng.random() < sigmoid(-4.5 + 0.015 * core + 0.5 * reperfused))
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
    )


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
