"""prepare.toml: strict loading (key paths in errors), the shipped recipe, source naming."""

from __future__ import annotations

import pytest

from orchestration.data.config import PrepareConfig, load_config
from orchestration.data.documents import resolve_sources, safe_name
from hanyeong.errors import ConfigError, DataError
from tests.conftest import QUICKSTART, REPO


def load(tmp_path, text: str) -> PrepareConfig:
    path = tmp_path / "prepare.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def test_defaults_and_a_full_file(tmp_path):
    assert load_config(None) == PrepareConfig()
    config = load(
        tmp_path,
        """
[[sources]]
name = "reviews"
paths = ["corpus/reviews"]
text_fields = ["review"]

[filters.length]
min_chars = 50
[filters.script]
scripts = ["hangul"]
min_ratio = 0.9
[dedup]
threshold = 0.7
[decontaminate]
root = "bench"
[[decontaminate.benchmarks]]
name = "mine"
files = ["*.jsonl"]
fields = ["q"]
[shards]
text_bytes_per_shard = 1_000_000
""",
    )
    assert config.filters.length.min_chars == 50 and config.filters.length.max_chars == 1_000_000
    assert config.filters.script.scripts == ("hangul",) and config.dedup.threshold == 0.7
    assert config.sources[0].paths == (str(tmp_path / "corpus/reviews"),)  # relative to the file
    assert config.decontaminate.root == str(tmp_path / "bench")
    assert config.decontaminate.benchmarks[0].fields == ("q",)
    assert PrepareConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "[filters.length]\nmin_char = 3",
            "filters.length: unknown key(s) min_char; known: enabled, min_chars, max_chars",
        ),
        ("[filterz]\nx = 1", "unknown key(s) filterz"),
        ("[dedup]\nthreshold = 'high'", "dedup.threshold must be float, got str 'high'"),
        ("[dedup]\nexact = 1", "dedup.exact must be bool, got int 1"),
        ("[dedup]\nthreshold = 1.5", "dedup.threshold must be in (0, 1]"),
        (
            "[filters.length]\nmin_chars = 10\nmax_chars = 5",
            "filters.length.min_chars (10) is above max_chars (5)",
        ),
        ("[filters.script]\nscripts = ['klingon']", "filters.script.scripts: unknown klingon"),
        (
            "[[decontaminate.benchmarks]]\nname = 'x'",
            "decontaminate.benchmarks[0]: missing key(s) files",
        ),
        (
            "[[decontaminate.benchmarks]]\nname = 'x'\nfiles = 'a.jsonl'",
            "decontaminate.benchmarks[0].files must be an array",
        ),
        (
            "[[decontaminate.benchmarks]]\nname='a'\nfiles=['x']\n[[decontaminate.benchmarks]]\nname='a'\nfiles=['y']",
            "the name 'a' is used twice",
        ),
        ("[shards]\ncompression = 'lz77'", "shards.compression must be zstd, snappy, gzip or none"),
        ("[dedup\n", "not valid TOML"),
    ],
)
def test_mistakes_name_their_key_path(tmp_path, text, message):
    with pytest.raises(
        ConfigError,
        match="prepare.toml: .*"
        + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ):
        load(tmp_path, text)


def test_shipped_recipe_loads_and_points_at_shared_benchmarks():
    config = load_config(REPO / "recipes" / "prepare-shared.toml")
    assert config.decontaminate.root == str(
        (REPO.parent / "shared" / "data" / "benchmarks").resolve()
    )
    assert config.decontaminate.window_chars == 50 and len(config.decontaminate.benchmarks) >= 15
    assert config.filters == PrepareConfig().filters  # everything else stays at its default


def test_sources_are_named_after_inputs():
    sources = {s.name: s for s in resolve_sources([str(QUICKSTART)], None)}
    assert {"nsmc_reviews", "sherlock", "tom_sawyer"} <= set(sources)
    assert [prefix for _, prefix in sources["sherlock"].files] == ["sherlock.txt.gz"]
    single = resolve_sources([str(QUICKSTART / "sherlock.txt.gz")], ["body"])
    assert single[0].name == "sherlock" and single[0].fields.paths == (("body",),)
    assert safe_name("../한국 뉴스!") == "한국_뉴스" and safe_name("...") == "source"


def test_source_names_from_folders_and_collisions(tmp_path):
    for folder in ("a/news", "b/news"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x.txt").write_text("문서\n")
    names = [s.name for s in resolve_sources([str(tmp_path / "a")], None)]
    assert names == ["news"]
    with pytest.raises(ConfigError, match="source 'news' comes from both"):
        resolve_sources([str(tmp_path / "a"), str(tmp_path / "b")], None)
    with pytest.raises(DataError, match="no such file or folder"):
        resolve_sources([str(tmp_path / "missing")], None)
