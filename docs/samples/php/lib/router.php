<?php
function route(string $path, int $views): string {
    if ($path === '/') {
        return "<h1>Hello from PHP</h1>";
    }
    if (preg_match('#^/blog/(\d{4})/([a-z0-9-]+)/?$#', $path, $m)) {
        return "post {$m[2]} of {$m[1]} (view {$views} in this session)";
    }
    http_response_code(404);
    return "no route for {$path}";
}
