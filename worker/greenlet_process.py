"""``python -m longhaul.worker.greenlet_process``: a worker process whose worker threads are greenlets.

The same process as `worker_process` (same arguments, signals and exit
codes), patched for gevent first: the patch must precede every other
import (see `greenlets`). Importing this module does nothing; only running
it patches, so a tool that imports every module (docs, tests) is unharmed.
"""

if __name__ == "__main__":
    from longhaul.worker.greenlets import patch_process

    patch_process()

    from longhaul.worker.worker_process import main

    main()
