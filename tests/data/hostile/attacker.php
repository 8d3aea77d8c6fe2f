<?php
// A hostile tenant's PHP page: try to read (or list) each path in ?paths=a|b|c and say what came back.
header('Content-Type: application/json');
$out = [];
foreach (array_slice(explode('|', $_GET['paths'] ?? ''), 0, 50) as $path) {
    if ($path === '') {
        continue;
    }
    if (@is_dir($path)) {
        $list = @scandir($path);
        $out[$path] = $list === false ? ['error' => 'denied'] : ['listed' => array_slice($list, 0, 50)];
    } else {
        $data = @file_get_contents($path, false, null, 0, 4096);
        $out[$path] = $data === false ? ['error' => 'denied'] : ['read' => base64_encode($data)];
    }
}
echo json_encode($out === [] ? ['attacker' => 'php here'] : $out);
