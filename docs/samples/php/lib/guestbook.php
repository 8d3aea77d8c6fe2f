<?php
// A guestbook in SQLite through PDO, kept in the site's own folder (data/ is written by the app; the
// platform never serves a database file).
function guestbook(): PDO {
    $folder = dirname(__DIR__) . '/data';
    if (!is_dir($folder)) {
        mkdir($folder, 0755);
    }
    $db = new PDO('sqlite:' . $folder . '/guestbook.sqlite');
    $db->setAttribute(PDO::ATTR_ERRMODE, PDO::ERRMODE_EXCEPTION);
    $db->exec('CREATE TABLE IF NOT EXISTS entries (name TEXT NOT NULL, at TEXT NOT NULL)');
    return $db;
}

function sign_guestbook(string $name): string {
    $name = mb_substr(trim($name), 0, 40);
    if ($name === '') {
        http_response_code(400);
        return "give your name as the form field 'name'";
    }
    guestbook()->prepare('INSERT INTO entries VALUES (?, ?)')->execute([$name, date('c')]);
    return 'signed by ' . htmlspecialchars(mb_strtoupper($name));
}

function guestbook_page(): string {
    $names = guestbook()->query('SELECT name FROM entries ORDER BY rowid')->fetchAll(PDO::FETCH_COLUMN);
    return '<ul>' . implode('', array_map(fn ($n) => '<li>' . htmlspecialchars($n) . '</li>', $names)) . '</ul>';
}
