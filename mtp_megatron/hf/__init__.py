"""Interoperability with Hugging Face ``transformers``: the twin model families of our trunk,
weight conversion both ways, and ``export-hf`` (transformers is needed only here)."""
