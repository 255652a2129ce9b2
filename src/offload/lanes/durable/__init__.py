"""The durable lane: persisted runs on Celery, run by worker processes (see `lane.py`)."""
