"""A Flask app served by gunicorn, as a Procfile starts it on Heroku or Dokku."""

import os

from flask import Flask, request

app = Flask(__name__)


@app.route("/")
def hello() -> str:
    name = request.args.get("name", "world")
    return f"<h1>Hello, {name}, from gunicorn</h1>"


@app.route("/api/worker")
def worker() -> dict[str, object]:
    # Which gunicorn worker answered: the Procfile asks for two.
    return {"pid": os.getpid(), "server": "gunicorn"}
