from roles.frontend._server import serve
from roles.frontend.config import FrontendConfig
from shared.process import role_main

if __name__ == "__main__":
    role_main(FrontendConfig, serve)
