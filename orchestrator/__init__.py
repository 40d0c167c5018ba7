"""Loom's driver side: config, plan, data pipelines and the thin Ray launch layer."""

__version__ = "0.1.0"
