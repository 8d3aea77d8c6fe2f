"""``python -m roles.worker --config <home>/role.json [--processes N]``"""

from __future__ import annotations

from roles.worker.config import WorkerConfig
from roles.worker.service import WORKER
from shared.process import preforked_role_main

if __name__ == "__main__":
    preforked_role_main(WorkerConfig, WORKER)
