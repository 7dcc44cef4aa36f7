"""Training-free repairs chosen from a diagnosis.

* ``plan.plan_repair``: which repairs, where, with how many bits, and why (from a diagnosis);
* ``run.repair``: applies a plan on calibration data (``walk.repair_walk`` does the work);
* the repairs, each usable alone: ``bias`` (bias correction), ``lowrank`` (output-error-optimal
  low-rank compensation), ``norm`` (norm recalibration), ``restore`` (precision restoration);
* ``budget``: what every repair costs, in extra bits per quantized weight.
"""
