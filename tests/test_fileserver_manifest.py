"""The fileserver's pure pieces: quota messages' sizes, the op semantics on a tree, and taking ops back."""

from __future__ import annotations

import random

import pytest

from roles.fileserver._history import History
from roles.fileserver._manifest import Tree, Undo, apply_ops, human_size
from shared.contracts.content import CommitOp, CommitRequest
from shared.errors import AlreadyExists, InvalidInput, NotFound, SitecloudError
from tests.support import random_op


def test_human_size() -> None:
    assert human_size(512) == "512 bytes"
    assert human_size(10 * 1024 * 1024) == "10 MB"
    assert human_size(int(12.3 * 1024 * 1024)) == "12.3 MB"
    assert human_size(3 * 1024**4) == "3 TB"


def _ops(*ops: dict[str, str]) -> list[CommitOp]:
    return CommitRequest.parse({"ops": list(ops)}).ops


def _tree(*ops: dict[str, str]) -> Tree:
    tree = Tree()
    apply_ops(tree, _ops(*ops), blob_size=lambda sha: 1, now=1.0)
    return tree


def test_puts_after_a_folder_moved_or_went_land_where_their_path_says() -> None:
    # Puts into one folder reuse it; a rename or rmdir in between must not send them to the old one.
    sha = "a" * 64
    tree = _tree(
        {"op": "put", "path": "a/x", "sha256": sha},
        {"op": "rename", "from": "a", "to": "b"},
        {"op": "put", "path": "a/y", "sha256": sha},
        {"op": "put", "path": "c/z", "sha256": sha},
        {"op": "delete", "path": "c/z"},
        {"op": "rmdir", "path": "c"},
        {"op": "put", "path": "c/w", "sha256": sha},
    )
    assert set(tree.files) == {"b/x", "a/y", "c/w"}
    assert tree.file_count == 3
    # A frozen tree's folders belong to no change: a later change of it copies them first.
    tree.freeze(lambda digest, data: None)
    before = set(tree.begin().files)
    later = tree.begin()
    apply_ops(later, _ops({"op": "put", "path": "c/v", "sha256": sha}), blob_size=lambda sha: 1, now=1.0)
    assert set(later.files) == before | {"c/v"} and set(tree.files) == before
    with pytest.raises(InvalidInput, match="it is a directory"):
        apply_ops(later, _ops({"op": "put", "path": "c", "sha256": sha}), blob_size=lambda sha: 1, now=1.0)


def test_directory_rename_moves_the_subtree_and_only_it() -> None:
    sha = "a" * 64
    tree = _tree(
        {"op": "put", "path": "app/x/f", "sha256": sha},
        {"op": "put", "path": "apple", "sha256": sha},
        {"op": "mkdir", "path": "app/empty"},
        {"op": "rename", "from": "app", "to": "srv/app2"},
    )
    assert set(tree.files) == {"srv/app2/x/f", "apple"}
    assert tree.dirs == {"srv", "srv/app2", "srv/app2/x", "srv/app2/empty"}


@pytest.mark.parametrize(
    ("op", "error"),
    [
        ({"op": "rename", "from": "f", "to": "f/g"}, InvalidInput),
        ({"op": "rename", "from": "d", "to": "f"}, AlreadyExists),
        ({"op": "rmdir", "path": "f"}, InvalidInput),
        ({"op": "delete", "path": "d/none"}, NotFound),
        ({"op": "mkdir", "path": "f/sub"}, InvalidInput),
        ({"op": "put", "path": "x"}, InvalidInput),
    ],
)
def test_bad_ops(op: dict[str, str], error: type[Exception]) -> None:
    tree = _tree({"op": "put", "path": "f", "sha256": "b" * 64}, {"op": "mkdir", "path": "d"})
    with pytest.raises(error):
        apply_ops(tree, _ops(op), blob_size=lambda sha: 1, now=1.0)


def _digest(tree: Tree) -> str:
    return tree.freeze(lambda digest, data: None)


def _versions(seed: int, count: int, history: History) -> list[Tree]:
    """A site's trees after a deploy and ``count`` FTP-like commits of one to three ops each."""
    rng = random.Random(seed)
    shas = [c * 64 for c in "abc"]
    first = _tree(*({"op": "put", "path": f"d{n % 3}/f{n}", "sha256": shas[n % 3]} for n in range(12)))
    _digest(first)
    history.add(1, flipped=True, undos=None)
    trees = [Tree(), first]
    while len(trees) <= count:
        head = trees[-1]
        ops = [random_op(rng, set(head.files), head.dirs, shas) for _ in range(rng.randint(1, 3))]
        tree, undos = head.begin(), list[Undo]()
        try:
            apply_ops(tree, _ops(*ops), blob_size=lambda sha: 1, now=float(len(trees)), undos=undos)
        except SitecloudError:
            continue  # refused, as the fileserver refuses it: no version
        _digest(tree)
        # The count of folders a site's entry limit uses is kept right through every op.
        assert tree.dir_count == len(tree.dirs) == Tree(tree.root).dir_count
        history.add(len(trees), flipped=False, undos=undos)
        trees.append(tree)
    return trees


@pytest.mark.parametrize("seed", range(20))
def test_a_newer_tree_with_its_ops_taken_back_is_the_older_one_exactly(seed: int) -> None:
    history = History()
    trees = _versions(seed, 60, history)
    newest = len(trees) - 1
    for to in range(1, newest):
        at = random.Random(seed + to).randint(to + 1, newest)
        past = history.rewind(trees[at], at, to)
        assert past is not None
        assert _digest(past) == _digest(trees[to]), (seed, at, to)
        assert past.dir_count == trees[to].dir_count
        # Rewinding copies: the tree it started from is as it was.
        assert set(trees[at].files) == set(trees[at].begin().files)
    # Past a deploy there is nothing to take back.
    assert history.rewind(trees[3], 3, 0) is None


def test_history_remembers_a_bounded_number_of_ops_and_forgets_across_a_gap() -> None:
    history = History(max_ops=10)
    trees = _versions(7, 30, history)
    assert history.rewind(trees[30], 30, 29) is not None
    assert history.rewind(trees[30], 30, 5) is None  # forgotten: the caller answers "not kept"
    assert history.flipped(30) is False and history.flipped(1) is None
    history.add(40, flipped=False, undos=[])
    assert history.flipped(30) is None and history.rewind(trees[30], 30, 29) is None


def test_history_read_back_takes_versions_back_as_before_and_a_bad_one_is_forgotten() -> None:
    history = History(max_ops=40)
    trees = _versions(3, 30, history)
    again = History.decode(history.encode(), max_ops=40)
    assert again.newest == history.newest == 30
    assert again.rewind(trees[30], 30, 25) is not None
    for to in range(29, 0, -1):
        before, after = history.rewind(trees[30], 30, to), again.rewind(trees[30], 30, to)
        assert (before is None) == (after is None), to
        if before is not None and after is not None:
            assert _digest(before) == _digest(after) == _digest(trees[to])
        assert again.flipped(to + 1) == history.flipped(to + 1)
    # Read back under a smaller bound, it keeps only what fits.
    assert History.decode(history.encode(), max_ops=5).rewind(trees[30], 30, 20) is None
    for bad in (b"", b"{", b'{"first": 1}', b'{"first": 1, "steps": [[false, [["put"]]]]}'):
        assert History.decode(bad).newest is None
