"""The core: what a run is and how one attempt goes, knowing no framework.

Nothing here imports Celery, kombu, SQLAlchemy or FastAPI (the import contract in
`pyproject.toml` holds it so); the lanes, the ledger and the web glue build on it.
"""
