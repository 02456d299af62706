"""The default ProAlign reading (METHOD.md Step 5), in a module light enough for the CLI to import.

Chosen by measurement on the planted-signal suite (`python -m proalign.bench.quality`); the README
section "Which ProAlign reading to use" gives the numbers behind it.
"""
from __future__ import annotations

from typing import Sequence

# Soft assignment over prototypes, one embedding row per (tau, prior) pair, E of shape
# (4, K + K·d): the coarse row keeps proportions and mixtures, the sharp rows each type's own mean.
# Half a pseudo-patch per prototype steadies the mean of a type a slide barely has (morphology);
# the last row repeats the sharpest tau without it, so a type the slide lacks shows as a mean of
# stray patches, not as its prototype (a rare type's absence).
DEFAULT_PROALIGN = {"tau": (0.2, 0.05, 0.025, 0.025), "over": "prototypes", "moments": 1,
                    "prior": (0.5, 0.5, 0.5, 0.0)}
ROW_PRIOR = 0.5  # an unset prior with temperatures of the user's own: this on every row


def default_taus() -> tuple[float, ...]:
    """The default temperature(s) as a tuple (several give one embedding row each)."""
    t = DEFAULT_PROALIGN["tau"]
    return tuple(float(v) for v in t) if isinstance(t, (list, tuple)) else (float(t),)


def default_prior(over: str, taus: Sequence[float] | None = None) -> float | tuple[float, ...]:
    """The prior an unset --prior means: 0 unless over=prototypes (the prior is an option of
    over=prototypes only); the default reading's per-row priors with its temperatures (taus None
    or equal to them); else ROW_PRIOR on every row."""
    if over != "prototypes":
        return 0.0
    if taus is None or tuple(float(t) for t in taus) == default_taus():
        return tuple(float(p) for p in DEFAULT_PROALIGN["prior"])
    return ROW_PRIOR
