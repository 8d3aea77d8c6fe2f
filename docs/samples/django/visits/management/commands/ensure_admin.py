"""`python manage.py ensure_admin`: the admin user named by the site's settings DJANGO_ADMIN_USER and
DJANGO_ADMIN_PASSWORD, made once (the release command runs it after each deploy and settings change)."""

import os

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Make the admin user the site's settings name, unless it is there."

    def handle(self, *args: object, **options: object) -> None:
        name = os.environ.get("DJANGO_ADMIN_USER", "")
        password = os.environ.get("DJANGO_ADMIN_PASSWORD", "")
        if not name or not password:
            self.stdout.write("no admin user: set DJANGO_ADMIN_USER and DJANGO_ADMIN_PASSWORD to make one")
            return
        users = get_user_model()
        if users.objects.filter(username=name).exists():
            return
        users.objects.create_superuser(name, "", password)
        self.stdout.write(f"made the admin user {name}")
