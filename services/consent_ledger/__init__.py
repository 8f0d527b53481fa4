"""Consent ledger: the system of record for whether a conversation could be used for model training."""

__version__ = "0.1.0"
