"""``python -m worker.cli`` runs the wxphone command line. (For the gevent pool use ``wxphone`` or
``python -m worker``: importing this package imports what gevent must patch first.)"""

from worker.launch import main

main()
