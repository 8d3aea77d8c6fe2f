"""A FastAPI (ASGI) site: typed routes; the platform runs the ASGI app, no uvicorn needed."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def index() -> dict[str, str]:
    return {"hello": "from FastAPI"}


@app.get("/items/{item_id}")
async def item(item_id: int, q: str | None = None) -> dict[str, object]:
    return {"item_id": item_id, "q": q}
