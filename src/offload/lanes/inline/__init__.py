"""The inline lane: in the API process, after the response (see `lane.py`)."""

TASK_NAME_PREFIX = "offload.inline:"
"""asyncio tasks running inline runs are named `offload.inline:<task>:<run id>`; the event-loop
guard reads the name to say which run blocked the loop."""
