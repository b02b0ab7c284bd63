"""Named crash points, for reliability tests: with `LMERASER_FAILPOINT=name[,name...]` set, the
process SIGKILLs itself when it reaches a named point, as a power cut or an OOM kill would (no
`finally`, no cleanup). Unset, a failpoint costs one environment lookup.

The points (bench/reliability_kill.py and the tests kill at every one):
  after:<step>              an exact batch step finished and was saved (capture ... verify)
  apply:journaled           the batch's `applied` events are in the journal, the step not yet saved
  rebuild:ran               the changed stages ran, dvc.lock does not record them yet
  rebuild:reproduced        the stages ran and dvc.lock records them, the rebuild step not yet saved
  record:appended           the record is in the lineage log, the journal not yet told
  record:journaled          the journal says `verified`, the batch file not yet removed
  atomic:<file name>        an atomic write's temporary file is complete, not yet renamed
  directory:staged          a replacement directory is complete (`.NAME.<pid>.new`), not swapped in
  directory:swapped-out     the old directory is moved aside, the new one not yet in place
  directory:swapped-in      the new directory is in place, the old one not yet deleted
  influence:edited          the edited prompt files are written, the audit and the overlay not yet
  influence:overlay-written the influence overlay serves the update, its record not yet appended
  influence:record-appended the influence record is appended, the journal not yet told
"""

from __future__ import annotations

import os
import signal

FAILPOINT_ENV = "LMERASER_FAILPOINT"

NAMED = (
    "after:capture",
    "after:apply",
    "after:version",
    "after:rebuild",
    "after:purge",
    "after:verify",
    "apply:journaled",
    "rebuild:ran",
    "rebuild:reproduced",
    "record:appended",
    "record:journaled",
    "atomic:tombstones.csv",
    "directory:staged",
    "directory:swapped-out",
    "directory:swapped-in",
    "influence:edited",
    "influence:overlay-written",
    "influence:record-appended",
    "mlflow:store-initialized",  # the workspace's MLflow store is created only once (tracking.ensure_store)
    "mlflow:store-complete",
)


def failpoint(name: str) -> None:
    """SIGKILL this process here if $LMERASER_FAILPOINT names this point."""
    wanted = os.environ.get(FAILPOINT_ENV)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
