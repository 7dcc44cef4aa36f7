"""Training-free repairs chosen from a diagnosis."""
