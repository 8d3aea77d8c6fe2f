import { createServer, IncomingMessage, ServerResponse } from "node:http";

interface Greeting {
  name: string;
  compiled: boolean;
}

function greet(name: string): Greeting {
  return { name, compiled: true };
}

const server = createServer((req: IncomingMessage, res: ServerResponse) => {
  const url = new URL(req.url ?? "/", "http://localhost");
  if (url.pathname === "/api/greeting") {
    const body = JSON.stringify(greet(url.searchParams.get("name") ?? "world"));
    res.writeHead(200, { "Content-Type": "application/json" });
    res.end(body);
    return;
  }
  res.writeHead(200, { "Content-Type": "text/html; charset=utf-8" });
  res.end("<h1>Hello from TypeScript</h1>\n");
});

server.listen(Number(process.env.PORT ?? 3000));
