"""Worker processes for the durable lane: what `offload worker` and `offload serve` run.

`loading` finds the application's `Offload`, `supervisor` starts consumers and keeps them
alive, `child` is one consumer (`python -m offload.worker` starts one in a fresh interpreter).
"""

from offload.worker.loading import load_offload as load_offload
from offload.worker.supervisor import Supervisor as Supervisor
from offload.worker.supervisor import embedded_worker_lock as embedded_worker_lock
