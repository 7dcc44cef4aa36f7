"""The main job (``bitcliff cliff``): the cliff of one model across widths, diagnosed and repaired.

May import: every package below it (repairs, diagnosis, quant, kernels) and the small modules
(assets, data, device, eval, models, numerics, storage); never the command line.
"""
