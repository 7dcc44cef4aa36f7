"""Diagnosis: why a quantized model breaks, from captured error signals and FP vs Q runs.

``bitcliff.diagnose(fp_model, q_model, texts, ...)`` (:func:`bitcliff.diagnosis.run.diagnose`)
runs every analysis and returns a ``DiagnosisReport``.  The analyses, each usable alone:

* ``signal``: signal propagation tracing (residual error, cosine, growth, local vs propagated,
  logit lens);
* ``components``: component function F(c), attention-pattern divergence, MLP gate agreement;
* ``patching``: activation patching recovery per (layer, component);
* ``layer_errors``: the kernels' error capture aggregated per layer (``capture.CaptureSession``);
* ``inputs``: which inputs break (per-example damage, cross-method correlation, magnitude
  predictor);
* ``verdict``: degradation vs collapse, with thresholds and evidence; ``report``: JSON/HTML.

May import: quant, kernels, and the small modules (``eval``, ``models``, ``layers``, ``device``, ``storage``);
never repairs or above.  Named ``diagnosis`` (a noun), not ``diagnose``, so that the package does
not shadow the function ``bitcliff.diagnose``.
"""
