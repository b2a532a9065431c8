"""Phone-code and login jobs: validation, domain functions and their Celery tasks."""
