from roles.frontend._server import serve
from roles.frontend.config import FrontendConfig
from shared.prefork import strip_processes_flag
from shared.process import role_main

if __name__ == "__main__":
    strip_processes_flag()
    role_main(FrontendConfig, serve)
