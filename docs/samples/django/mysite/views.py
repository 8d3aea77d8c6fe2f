from django.db import connection
from django.http import HttpResponse, JsonResponse


def index(request):
    return HttpResponse("<h1>Hello from Django</h1>")


def visits(request):
    """A counter kept in db.sqlite3 beside the code: it outlives the app's restarts and deploys."""
    with connection.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS visits (n INTEGER NOT NULL)")
        cur.execute("INSERT INTO visits VALUES (1)")
        cur.execute("SELECT COUNT(*) FROM visits")
        (count,) = cur.fetchone()
    return JsonResponse({"visits": count})
