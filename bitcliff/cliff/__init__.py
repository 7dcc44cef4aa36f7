"""The main job (``bitcliff cliff``): the cliff of one model across widths, diagnosed and repaired."""
