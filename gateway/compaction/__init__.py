"""Context compaction: keep long sessions under the model's window (policy block ``context``).

``windows`` knows each model's window, ``calibration`` how far tiktoken is from each provider's
count, ``conversation`` the entries of a request being rewritten and the ``Rewrite`` saved with
the session, ``strategies`` one module per strategy, ``summary`` the summary call, and
``compactor`` when and in which order all of it runs.
"""

from __future__ import annotations

from gateway.compaction.calibration import Calibration
from gateway.compaction.compactor import Call, Compactor, Outcome, Overflow
from gateway.compaction.conversation import Rewrite
from gateway.compaction.job import Summary, SummaryFailed
from gateway.compaction.windows import window_of

__all__ = [
    "Calibration",
    "Call",
    "Compactor",
    "Outcome",
    "Overflow",
    "Rewrite",
    "Summary",
    "SummaryFailed",
    "window_of",
]
