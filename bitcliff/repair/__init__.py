"""Training-free repairs chosen from a diagnosis (DESIGN §6); no repair is implemented yet."""
