"""The running services: ledger writer, stream processors and audit API."""
