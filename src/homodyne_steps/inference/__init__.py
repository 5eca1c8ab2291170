"""Inference: the likelihood statistics NLSQ and CMC share, the Levenberg–Marquardt
solver and identifiability, the noise model, chunking, consensus Monte Carlo maths and
diagnostics. Pure functions of arrays; imports base, physics and io.
"""
