"""Settings for a site on sitecloud: secrets from the site's settings (environment), the database
beside the code as `django-admin startproject` keeps it (the app may write its own folder; the
platform never serves db.sqlite3 to visitors)."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "set DJANGO_SECRET_KEY with `sitecloud site set`")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
# The front end routes only this site's own hostnames here.
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["django.contrib.staticfiles"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": BASE_DIR / "db.sqlite3",
    }
}
# Files under static/ are served by the platform as they are, without waking the app.
STATIC_URL = "static/"
USE_TZ = True
