"""A FastAPI (ASGI) site: typed routes and a WebSocket echo; the platform runs the ASGI app, no uvicorn needed."""

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()


@app.get("/")
async def index() -> dict[str, str]:
    return {"hello": "from FastAPI"}


@app.get("/items/{item_id}")
async def item(item_id: int, q: str | None = None) -> dict[str, object]:
    return {"item_id": item_id, "q": q}


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"FastAPI heard: {text}")
    except WebSocketDisconnect:
        pass
