"""Data cleaning and quality: the preprocessing maths and the QC checks, repairs and
scoring table. Imports base and io.
"""
