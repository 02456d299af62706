"""Generated inputs with a known answer, for the tests, the benchmarks and the demo (not used by
the engine itself): slide files (`synthetic_slides`: Aperio SVS, pyramidal TIFF, ...), patch
feature files (`synthetic_features`: TRIDENT/CLAM .h5, .pt), cohorts with planted labels
(`planted_cohort`) and planted signals for the quality suite (`planted_signals`), and encoder
folders with random weights of the real architectures (`random_weights`)."""
