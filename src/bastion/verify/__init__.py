"""Verification: a network IR, sound bound propagation, complete search, VNN-LIB specifications."""
