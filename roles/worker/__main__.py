"""``python -m roles.worker --config <home>/role.json``"""

from __future__ import annotations

from roles.worker.config import WorkerConfig
from roles.worker.service import serve
from shared.prefork import strip_processes_flag
from shared.process import role_main

if __name__ == "__main__":
    strip_processes_flag()
    role_main(WorkerConfig, serve)
