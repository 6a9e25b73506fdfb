"""``make test`` runs pytest through this: the whole pytest session as usual (collection, tests, summary,
unconfigure), then the process leaves with pytest's exit status through ``os._exit``, without Python's
interpreter teardown.

Why: tests start and stop Ray in this process a dozen times (``run_search`` with a local Ray). After
``ray.shutdown()`` Ray's native threads stay behind (gRPC's event engine and timers, the GCS client's io
service, OpenCensus' harvester loop; Ray's own issue 31145: restarting Ray in one process is not safe), as
do Arrow's and OpenBLAS' thread pools. A CI run ended in a segmentation fault (exit 139) *after* every test
passed and pytest printed "587 passed"; the likely cause is C++ static destructors running at interpreter
exit under those threads, which Ray's own workers avoid by leaving through os._exit too. Nothing is lost
here: pytest has finished and written everything by then; only Python's atexit handlers and module teardown
are skipped, and every test that starts Ray shuts it down itself.

Plain ``python -m pytest`` still works; it is only exposed to that teardown crash.
"""

from __future__ import annotations

import os
import sys

import pytest

if __name__ == "__main__":
    code = int(pytest.main(sys.argv[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
