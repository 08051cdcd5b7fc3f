"""Trees a task made, listed and removed at any depth and never through its symlinks: Python
3.11's os.walk and shutil.rmtree recurse, and a task's 1,100 nested directories made the
Agent Protocol's listings and the retention sweep fail for every tenant."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agentnode.trees import regular_files, remove_tree


def nest(root: Path, depth: int, every: int = 0) -> None:
    """`depth` directories one in the other under `root`, a file in each `every`-th."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(depth):
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
        if every and i % every == 0:
            os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.symlink("/etc", "out", dir_fd=fd)
    os.close(fd)


@pytest.mark.parametrize("depth", [1, 31, 32, 33, 100, 3000])
def test_a_tree_of_any_depth_is_removed_and_nothing_it_points_to(
    tmp_path: Path, depth: int
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    root = tmp_path / "ws"
    root.mkdir()
    nest(root, depth, every=7)
    (root / "link").symlink_to(target)
    (root / "hard").hardlink_to(target / "keep")
    os.mkfifo(root / "fifo")
    remove_tree(root)
    assert not root.exists()
    assert (target / "keep").read_text() == "x"


def test_removing_what_is_not_a_directory_removes_it_alone(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for name in ("file", "link", "missing"):
        remove_tree(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_what_cannot_be_removed_is_left_and_the_rest_goes(tmp_path: Path) -> None:
    """As rmtree with ignore_errors: what cannot go stays, and the removal ends."""
    root = tmp_path / "ws"
    root.mkdir()
    nest(root, 40, every=5)
    (root / "sticky").mkdir()
    (root / "sticky" / "f").write_text("x")
    subprocess.run(["chattr", "+i", str(root / "sticky" / "f")], check=True)
    try:
        remove_tree(root)
        assert sorted(p.name for p in root.iterdir()) == ["sticky"]
    finally:
        subprocess.run(["chattr", "-i", str(root / "sticky" / "f")], check=True)
        shutil.rmtree(root)


def test_regular_files_lists_as_os_walk_at_any_depth(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y").write_text("")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("")
    (tmp_path / "z").write_text("")
    (tmp_path / "ln").symlink_to("/etc/passwd")
    (tmp_path / "dl").symlink_to("/etc")
    os.mkfifo(tmp_path / "fifo")
    assert list(regular_files(tmp_path)) == ["z", "a/x", "b/y"]
    deep = tmp_path / "deep"
    deep.mkdir()
    nest(deep, 1500, every=100)
    try:
        found = list(regular_files(deep))
    finally:
        remove_tree(deep)  # pytest's own clean-up of old runs would recurse on it
    # Every file whose path fits in PATH_MAX; none past the symlink at the bottom.
    assert len(found) == 15 and found[0] == "d/f0" and not any("out" in p for p in found)
