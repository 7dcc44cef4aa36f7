"""Scaling laws of the quantization damage per knowledge stratum: strata, sweep, law, fit, plots."""
