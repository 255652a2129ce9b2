"""offload's HTTP surface: the status API (`api.py`)."""
