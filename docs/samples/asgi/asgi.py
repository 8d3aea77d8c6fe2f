"""A plain ASGI app, no framework and no dependencies: a page, and a WebSocket echo on /ws."""


async def app(scope, receive, send):
    if scope["type"] == "http":
        await receive()
        body = b"<h1>Hello from plain ASGI</h1>"
        headers = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif scope["type"] == "websocket":
        if scope["path"] != "/ws":
            await send({"type": "websocket.close", "code": 1008})
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        count = 0
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            count += 1
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": f"{count}: {message['text']}"})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})
