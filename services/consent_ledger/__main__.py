"""`python -m consent_ledger` runs the CLI (how `up` starts its child services)."""

from consent_ledger.cli import main

# Guarded: replay's verifying process (multiprocessing, spawn) imports this module again as `__mp_main__`.
if __name__ == "__main__":
    main()
