"""Diagnosis: why a quantized model breaks, from captured error signals and FP vs Q runs.

``bitcliff.diagnose(fp_model, q_model, texts, ...)`` runs every analysis and returns a
``DiagnosisReport`` (see ``run.diagnose``).  The analyses, each usable alone:

* ``signal``: signal propagation tracing (residual error, cosine, growth, local vs propagated,
  logit lens);
* ``components``: component function F(c), attention-pattern divergence, MLP gate agreement;
* ``patching``: activation patching recovery per (layer, component);
* ``layer_errors``: the kernels' error capture aggregated per layer (``capture.CaptureSession``);
* ``inputs``: which inputs break (per-example damage, cross-method correlation, magnitude
  predictor);
* ``verdict``: degradation vs collapse, with thresholds and evidence; ``report``: JSON/HTML.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    """Lets ``bitcliff.diagnose`` be both this package and the ``diagnose()`` entry point (the
    attribute ``bitcliff.diagnose`` is the package as soon as any submodule is imported, so a
    plain function of that name in ``bitcliff/__init__`` would be shadowed)."""

    def __call__(self, fp_model, q_model, texts, **kwargs):
        from bitcliff.diagnose.run import diagnose

        return diagnose(fp_model, q_model, texts, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
