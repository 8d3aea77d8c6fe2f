"""``python -m roles.worker --config <home>/role.json``"""

from __future__ import annotations

from roles.worker.config import WorkerConfig
from roles.worker.service import serve
from shared.process import role_main

if __name__ == "__main__":
    role_main(WorkerConfig, serve)
