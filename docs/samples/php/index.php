<?php
// A front controller, as WordPress permalinks and most PHP frameworks use: every path that is not a
// file comes here, and the route is read from the request URI.
session_start();
$_SESSION['views'] = ($_SESSION['views'] ?? 0) + 1;
require __DIR__ . '/lib/router.php';
require __DIR__ . '/lib/guestbook.php';
$path = parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH);
if ($_SERVER['REQUEST_METHOD'] === 'POST' && $path === '/upload') {
    // As a media library does: the file is kept in the site's own folder and linked from there.
    echo save_upload($_FILES['photo'] ?? null, __DIR__ . '/uploads');
    exit;
}
if ($path === '/guestbook') {
    echo $_SERVER['REQUEST_METHOD'] === 'POST' ? sign_guestbook($_POST['name'] ?? '') : guestbook_page();
    exit;
}
echo route($path, $_SESSION['views']);
