"""The keeper: checkpoints the data dir's stores and keeps its manifest (see ``actors/core/integrity.py``)."""
