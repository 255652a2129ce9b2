"""The two lanes: `inline` (in the API process, after the response) and `durable` (Celery)."""
