// An Express site: routes, JSON, static files from public/, and a WebSocket echo on /ws.
// The platform gives the port in $PORT, as other hosts do.
const http = require("http");
const path = require("path");
const express = require("express");
const { WebSocketServer } = require("ws");

const app = express();
app.use(express.static(path.join(__dirname, "public")));

app.get("/", (req, res) => {
  const name = req.query.name || "world";
  res.type("html").send(`<h1>Hello, ${escape(name)}, from Express</h1>`);
});

app.get("/api/echo/:word", (req, res) => {
  res.json({ word: req.params.word, upper: req.params.word.toUpperCase() });
});

const server = http.createServer(app);
const wss = new WebSocketServer({ server, path: "/ws" });
wss.on("connection", (socket) => {
  socket.on("message", (data, isBinary) => {
    socket.send(isBinary ? data : `echo: ${data}`, { binary: isBinary });
  });
});

const port = Number(process.env.PORT || 3000);
server.listen(port, () => console.log(`listening on ${port}`));

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
