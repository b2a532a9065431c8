"""``python -m worker.cli`` runs the wxphone command line."""

from worker.cli import main

main()
