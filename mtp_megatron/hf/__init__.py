"""Interoperability with Hugging Face ``transformers``: the twin model families of our trunk,
weight conversion both ways, ``export-hf`` and the pretrained start of a run (``init_from``).
Only ``export-hf`` needs ``transformers`` itself (its config classes)."""
