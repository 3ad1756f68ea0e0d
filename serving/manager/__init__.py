"""The job manager: owns the durable job store and the scheduler, and drives the workers.

One replica, on the head node (it asks for a sliver of the `i2v_head` resource, because the job
store is a file there). Its loop: read how many worker replicas of each class are running, ask
the scheduler which queued jobs go where, stream each dispatched job from a worker of that
class, and write every change to the job store. A job survives: a worker dying (retried), out
of memory (retried on the next larger class), and a farm restart (queued and running jobs are
read back and scheduled again).

By concern:
- `core.py`: `JobManager` (the Serve deployment): its state, the requests the API routes to it
  (submit, get, list, cancel, preview, upload_finished, cluster, ...), the loop, and its writes
  to the job store, checked by the record's type (`_update`, `_defer`).
- `attempts.py`: a job's attempts on workers: dispatch, the worker call, its events, and how an
  attempt ends (succeeded, retried, failed).
- `capacity.py`: the worker replicas Serve runs per class: free slots, how often to read them,
  the classes as `GET /v1/cluster` shows them.
- `recovery.py`: the unfinished jobs of an earlier run, scheduled again at start-up.
- `records.py`: the records it creates, typed (`serving.jobs.JobRecord`); `views.py`: the job
  as clients see it, and queue positions.
- `adapters.py`: LoRA adapters (issue 18); `result_reuse.py`: result reuse (issue 18).
"""

from .attempts import PROGRESS_SAVE_S, Running
from .capacity import REPLICA_REFRESH_S, REPLICA_REFRESH_STABLE_S
from .core import DISPATCH_TICK_S, JobManager, _error_reply

__all__ = ["DISPATCH_TICK_S", "PROGRESS_SAVE_S", "REPLICA_REFRESH_S", "REPLICA_REFRESH_STABLE_S", "JobManager",
           "Running", "_error_reply"]
