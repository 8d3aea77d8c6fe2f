from django.http import HttpResponse, JsonResponse
from visits.models import Visit


def index(request):
    return HttpResponse("<h1>Hello from Django</h1>")


def visits(request):
    """A counter kept in db.sqlite3 beside the code: its table made by the release command's
    `migrate`, it outlives the app's restarts and deploys."""
    Visit.objects.create()
    return JsonResponse({"visits": Visit.objects.count()})
