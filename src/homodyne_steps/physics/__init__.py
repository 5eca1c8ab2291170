"""The physics: the parameter registry, the one c2 kernel, sampling coordinates and
spaces, per-angle scaling maps and the reference cases. Imports only the base modules.
"""
