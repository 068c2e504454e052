"""How often workers report on their partitions, and when a partition counts as silent or stalled."""

from __future__ import annotations

#: Seconds between two reports of a worker's figures to the database.
FLUSH_INTERVAL = 5.0
#: A partition whose queue holds messages while nothing of it started or ended for
#: this many seconds is stalled: logged at WARNING by its worker, shown in the admin.
STALL_AFTER = 60.0
#: A consumer whose last report is older than this is shown as silent.
SILENT_AFTER = 3 * FLUSH_INTERVAL
