"""The default ProAlign reading (METHOD.md Step 5), in a module light enough for the CLI to import.

Chosen by measurement on the planted-signal suite (`python -m proalign.bench.quality`); the README
section "Which ProAlign reading to use" gives the numbers behind it.
"""
# Soft assignment over prototypes at three temperatures (one embedding row each, E of shape
# (3, K + K·d)): the coarse row keeps proportions and mixtures, the sharp rows each type's own mean;
# half a pseudo-patch per prototype steadies the mean of a type a slide barely has.
DEFAULT_PROALIGN = {"tau": (0.2, 0.05, 0.025), "over": "prototypes", "moments": 1, "prior": 0.5}


def default_taus() -> tuple[float, ...]:
    """The default temperature(s) as a tuple (several give one embedding row each)."""
    t = DEFAULT_PROALIGN["tau"]
    return tuple(float(v) for v in t) if isinstance(t, (list, tuple)) else (float(t),)


def default_prior(over: str) -> float:
    """The prior an unset --prior means: the default reading's with over=prototypes, else 0 (the
    prior is an option of over=prototypes only)."""
    return float(DEFAULT_PROALIGN["prior"]) if over == "prototypes" else 0.0
