"""Training-free repairs chosen from a diagnosis.

* ``registry``: the repairs and the contract each fulfils (one module per repair: ``bias``,
  ``lowrank``, ``norm``, ``outliers``, ``restore``; a new repair is one more module);
* ``plan.plan_repair``: which repairs, where, with how many bits, and why (from a diagnosis);
* ``measure.measure_repairs``: what each repair step would buy, module by module, and
  ``allocate``: the budget split across modules and repairs by it (the global allocator);
* ``run``: ``repair`` applies a plan (``walk.repair_walk`` does the work, on the share-group walk
  GPTQ uses too), and ``diagnose_and_repair`` is the whole sequence: diagnose, plan, repair,
  evaluate, write;
* ``budget``: bits per weight, in common terms.

May import: diagnosis (to plan from it), quant, kernels and the shared modules (``knapsack``, ``layers``,
``statistics``, ``group_walk``, ``distributed``, ``device``, ``eval``, ``storage``); never cliff, study or the
command line.  Named ``repairs`` (a noun), not ``repair``, so that the package does not shadow the
function ``bitcliff.repair``.
"""
