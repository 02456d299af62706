"""The default ProAlign reading (METHOD.md Step 5), in a module light enough for the CLI to import.

Chosen by measurement on the planted-signal suite (`python -m proalign.bench.quality`); the README
section "Which ProAlign reading to use" gives the numbers behind it.
"""
DEFAULT_PROALIGN = {"tau": 0.1, "over": "patches", "moments": 1, "prior": 0.0}
