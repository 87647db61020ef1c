import json

import pytest

from qlab.core.atomic import atomic_path, write_json


def test_write_json_creates_the_folder_and_replaces_the_file(tmp_path):
    path = tmp_path / "a" / "row.json"
    write_json(path, {"ppl": 1.5})
    write_json(path, {"ppl": 2.5})
    assert json.loads(path.read_text()) == {"ppl": 2.5}
    assert [p.name for p in path.parent.iterdir()] == ["row.json"]  # no temporary file left behind


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "row.json"
    write_json(path, {"ppl": 1.5})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"ppl": ')  # half a file, then the run dies
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"ppl": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["row.json"]
    with pytest.raises(TypeError):  # not JSON: nothing is written
        write_json(tmp_path / "other.json", {"x": object()})
    assert not (tmp_path / "other.json").exists() and len(list(tmp_path.iterdir())) == 1
