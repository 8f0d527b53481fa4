"""`python -m consent_ledger` runs the CLI (how `up` starts its child services)."""

from consent_ledger.cli import main

main()
