"""The data layer: registry -> loaders -> format converters -> templates -> per-stage processors.

Everything here but `pipeline.py` is plain Python on rows and batches; `pipeline.py` turns it into Ray Data.
"""
