"""Scaling laws of the quantization damage per knowledge stratum: strata, sweep, law, fit, plots.

May import: quant, the small modules (assets, data, device, eval, models, layers, rows, storage); never
diagnosis, repairs or the command line.
"""
