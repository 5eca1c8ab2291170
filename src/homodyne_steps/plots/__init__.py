"""Figures of each stage's outputs (Matplotlib). Imports the layers below stages; never a
stage.
"""
