"""Datasets, collation and Lightning data modules: caption TSVs (CC3M-style) and the toy world."""
