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

// An uploaded image saved under $folder; its address, to link to.
function save_upload(?array $file, string $folder): string {
    $name = basename($file['name'] ?? '');
    if (($file['error'] ?? UPLOAD_ERR_NO_FILE) !== UPLOAD_ERR_OK
        || !preg_match('/^[A-Za-z0-9_-]+\.(jpe?g|png|gif|webp)$/', $name)) {
        http_response_code(400);
        return "send one image (jpg, png, gif or webp) as the form field 'photo'";
    }
    if (!is_dir($folder)) {
        mkdir($folder, 0755);
    }
    move_uploaded_file($file['tmp_name'], "$folder/$name");
    return "/uploads/$name";
}
