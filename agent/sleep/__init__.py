"""Idle sleep and wake-on-connect for add-ons whose plan allows it.

- `policy`: when an idle add-on should sleep, light or deep (pure).
- `listener`: one add-on's wake listener in its holder's namespace, the relay of waiting
  clients, and the activity meter (`Sleeper`).
- `store`: sleep states and wake figures on disk.
- `manager`: one `Sleeper` per sleep-enabled add-on, kept level-triggered from each pass,
  and the idle tick (`SleepManager`).

One logger for all of it: `orkestr.agent.sleep`.
"""

from __future__ import annotations

import logging

log = logging.getLogger("orkestr.agent.sleep")
