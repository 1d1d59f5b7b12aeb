"""Test-process workaround for a CPython bug (gh-106905, fixed in 3.11.8 and 3.12.2).

Before those releases, `ast.parse` keeps its recursion bookkeeping in state shared by every
call. A parse that runs inside another one breaks the outer one's count, which then fails with
"SystemError: AST constructor recursion depth mismatch". The nested parse can come from a
garbage collection during the outer parse: a finalizer logs an asyncio future's
never-retrieved exception, and Python 3.11 parses the traceback's source lines to underline
them. pytest parses source too: when it rewrites assertions and when it shows a failure. Seen
here as INTERNALERROR, twice, once while pytest was reporting a test's failure.

So in the test process each parse runs alone: no collection during it (nothing can then run
inside it), and one thread at a time.
"""

from __future__ import annotations

import ast
import gc
import sys
import threading
from typing import Any

if sys.version_info < (3, 11, 8) or (3, 12) <= sys.version_info < (3, 12, 2):
    _parse = ast.parse
    _alone = threading.RLock()

    def _parse_alone(*args: Any, **kwargs: Any) -> Any:
        with _alone:
            collecting = gc.isenabled()
            gc.disable()
            try:
                return _parse(*args, **kwargs)
            finally:
                if collecting:
                    gc.enable()

    ast.parse = _parse_alone
