"""Files: atomic strict JSON and pickle-free NPZ, the dataset record, the APS HDF5 reader
and writer, the fitted-data and CMC shard files. Imports the base and physics.
"""
