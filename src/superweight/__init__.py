"""Find, probe and protect the super weights of large language models."""

__version__ = "0.1.0"
