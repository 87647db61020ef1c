"""WikiText-2 text, the document split (calibration never overlaps evaluation), token windows."""
import pytest
import torch

from embedded import embedded  # noqa: F401
from qlab.models import data


@pytest.fixture(scope="module")
def text():
    return data.load_wikitext2()


def test_text_is_lf_and_documents_are_exact_pieces(text):
    assert "\r" not in text and len(text) == 1_285_622
    docs = data.documents(text)
    assert "".join(docs) == text
    assert len(docs) == 62
    assert docs[0].startswith(" = Robert Boulter = \n") and docs[1].startswith(" = Du Fu = \n")
    assert all(d.startswith(" = ") and not d.startswith(" = = ") for d in docs)


def test_calibration_and_evaluation_are_disjoint(text):
    split = data.split_documents(text, n_calibration=8, seed=0)
    assert set(split.calibration_docs).isdisjoint(split.evaluation_docs)
    assert sorted(split.calibration_docs + split.evaluation_docs) == list(range(62))
    assert len(split.calibration) + len(split.evaluation) == len(text)
    # no article of one part appears in the other (titles are unique lines)
    docs = data.documents(text)
    for i in split.calibration_docs:
        assert docs[i] not in split.evaluation
        title = docs[i].split("\n", 1)[0]
        assert title + "\n" not in split.evaluation
    # seeded: same seed same split, another seed another split
    assert data.split_documents(text, 8, seed=0) == split
    assert data.split_documents(text, 8, seed=1).calibration_docs != split.calibration_docs
    assert data.split_documents(text, 0).evaluation == text


def test_bad_split_sizes(text):
    with pytest.raises(ValueError, match="n_calibration"):
        data.split_documents(text, n_calibration=62)


def test_token_windows_by_hand():
    t = torch.arange(10)
    assert data.token_windows(t, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert data.token_windows(t, 3, 2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert data.token_windows(torch.arange(20), 2, 3, pick="spread").tolist() == [[0, 1], [6, 7], [12, 13]]
    with pytest.raises(ValueError, match="n_windows"):
        data.token_windows(t, 3, 4)
    with pytest.raises(ValueError, match="pick"):
        data.token_windows(t, 3, 2, pick="random")


def test_crlf_file_from_env(tmp_path, monkeypatch):
    f = tmp_path / "wiki.test.raw"
    f.write_bytes(b" = A = \r\n x \r\n = B = \r\n y \r\n")
    monkeypatch.setenv("QLAB_DATA", str(f))
    text = data.load_wikitext2()
    assert text == " = A = \n x \n = B = \n y \n"
    assert data.documents(text) == [" = A = \n x \n", " = B = \n y \n"]
    monkeypatch.setenv("QLAB_DATA", str(tmp_path / "missing.raw"))
    with pytest.raises(ValueError, match="does not exist"):
        data.load_wikitext2()


@pytest.mark.model
def test_full_test_split_is_589_windows_of_512(embedded):
    _, tokenizer = embedded
    tokens = data.tokenize(tokenizer, data.load_wikitext2())
    assert tokens.numel() == 301_948
    assert data.token_windows(tokens, 512).shape == (589, 512)
    assert tokens[0].item() != tokenizer.bos_token_id  # no BOS added
