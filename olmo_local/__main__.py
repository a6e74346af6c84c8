"""`python -m olmo_local` runs the olmo-local command line."""

from olmo_local.cli import main

main()
