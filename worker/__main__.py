"""``python -m worker`` runs the wxphone command line, as the ``wxphone`` script does."""

from worker.launch import main

main()
