"""The wxphone benchmark: wxphone against a raw Celery ceiling and a hand-rolled baseline.

Run ``python -m bench --help``; ``docs/performance.md`` explains the method and the figures.
"""
