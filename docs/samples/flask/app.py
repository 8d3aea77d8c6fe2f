"""A Flask site as people write one: templates, a JSON route, static files beside it."""

from flask import Flask, jsonify, render_template, request

app = Flask(__name__)


@app.route("/")
def index():
    return render_template("index.html", name=request.args.get("name", "world"))


@app.route("/api/echo/<word>")
def echo(word):
    return jsonify(word=word, upper=word.upper())
