"""``python -m roles.frontend --config <home>/role.json [--processes N]``"""

from roles.frontend._server import FRONTEND
from roles.frontend.config import FrontendConfig
from shared.process import preforked_role_main

if __name__ == "__main__":
    preforked_role_main(FrontendConfig, FRONTEND)
