"""clean: normalisation, HTML extraction, harmful filter, and each quality rule on its own."""

from pathlib import Path

import pytest

from conftest import read_group, run_direct
from jielong.tasks import clean, ingest
from jielong.tasks.clean import clean_document, normalize
from jielong.tasks.config import CleanConfig, load_config

WEB = CleanConfig()  # the published thresholds
PROSE = (
    "The quick brown fox jumps over the lazy dog and then it runs to the river with the other animals. "
    "It is a simple sentence that people use to test the typewriters of the past and the keyboards of today. "
    "Nobody knows who wrote it first, but it has been used for more than a century by printers and teachers. "
    "Children learn it at school because it contains every letter of the alphabet. "
    "Designers still print it to compare the shapes of their fonts with each other."
)


def only(family: str, **settings) -> CleanConfig:
    """A config where only one quality family is enabled (with optional overrides)."""
    cfg = CleanConfig()
    cfg.harmful.enabled = False
    for name in ("gopher_quality", "gopher_repetition", "c4", "fineweb"):
        getattr(cfg, name).enabled = name == family
    for key, value in settings.items():
        setattr(getattr(cfg, family), key, value)
    return cfg


def reason(text: str, cfg: CleanConfig, content_type: str = "text/plain") -> str | None:
    return clean_document({"id": "d", "text": text, "source": "s", "content_type": content_type}, cfg)[1]


def test_prose_passes_every_web_rule():
    assert reason(PROSE, CleanConfig()) is None


# ---------------------------------------------------------------- normalisation


def test_normalize_controls_newlines_nfc_and_mojibake():
    text = "caf\u0065\u0301\r\nline\x00two\x07\rthree"
    assert normalize(text, WEB) == "caf\u00e9\nlinetwo\nthree"
    assert normalize("The Mona Lisa doesnâ€™t have eyebrows.", WEB) == "The Mona Lisa doesn’t have eyebrows."


def test_normalize_leaves_code_quotes_and_entities():
    code = 'if a >= b and s == "&lt;tag&gt;":\n    return \'x\''
    assert normalize(code, WEB) == code


# ---------------------------------------------------------------- HTML


def test_html_extraction_drops_script_style_comments_and_keeps_breaks():
    html = (
        "<!DOCTYPE html><html><head><style>p {color: red}</style><script>var SCRIPT_TEXT = 1;</script></head>"
        "<body><!-- COMMENT_TEXT --><h1>Title</h1><p>Fish &amp; chips &lt;3 are good.</p>"
        "<p>Second<br>line</p><pre>    indented code</pre></body></html>"
    )
    cleaned, why, _, _ = clean_document({"id": "d", "text": html, "source": "s", "content_type": "text/html"},
                                        only("none"))
    assert why is None
    text = cleaned["text"]
    for hidden in ("SCRIPT_TEXT", "COMMENT_TEXT", "color: red", "<p>"):
        assert hidden not in text
    assert "Fish & chips <3 are good." in text
    assert "Second\nline" in text
    assert "    indented code" in text
    assert text.index("Title") < text.index("Fish") and "\n" in text


def test_html_auto_detects_pages_but_not_docstrings_with_tags():
    cfg = only("none")
    page = clean_document({"id": "d", "text": "<html><body><p>Hi there</p></body></html>", "source": "s", "content_type": "text/plain"}, cfg)[0]
    assert page["text"] == "Hi there"
    doc = "Use <b>bold</b> markup like this."
    assert clean_document({"id": "d", "text": doc, "source": "s", "content_type": "text/plain"}, cfg)[0]["text"] == doc


def test_html_that_is_only_script_is_empty():
    assert reason("<html><script>x()</script></html>", only("none"), "text/html") == "empty"


# ---------------------------------------------------------------- harmful content


def test_harmful_words_from_shipped_list():
    cfg = only("none")
    cfg.harmful.enabled = True
    assert reason(PROSE + " What a shit show.", cfg) == "harmful_content"
    assert reason(PROSE + " The assessment of this class is classic.", cfg) is None  # whole words only
    cfg.harmful.allow_words = ["xxx"]
    assert reason(PROSE + " XXX fix this later.", cfg) is None
    cfg.harmful.max_matches = 1
    assert reason(PROSE + " shit", cfg) is None


# ---------------------------------------------------------------- Gopher quality, rule by rule


@pytest.mark.parametrize(
    "rule,text",
    [
        ("min_words", "Too short to keep."),
        ("max_words", " ".join(["word"] * 120_000)),
        ("min_avg_word_length", " ".join(["a b c d"] * 20) + " the and of the with"),
        ("max_avg_word_length", " ".join(["extraordinarilylongwordthing"] * 60) + " the and"),
        ("max_symbol_word_ratio", PROSE + " #" * 40),
        ("max_bullet_lines_ratio", "\n".join(f"• item number {i} of the list and more words" for i in range(10))),
        ("max_ellipsis_lines_ratio", "\n".join(f"this line is cut off and the rest of it {i}..." for i in range(10))),
        ("min_alpha_words_ratio", PROSE + " " + " ".join(["123 456 789 000 = + - * / 42"] * 10)),
        ("min_stop_words", " ".join(["python compiler parser tokenizer grammar"] * 12)),
    ],
)
def test_gopher_quality_rule(rule, text):
    assert reason(text, only("gopher_quality")) == f"gopher_quality.{rule}"
    # switching that one rule off lets the text through that rule
    assert reason(text, only("gopher_quality", **{rule: None})) != f"gopher_quality.{rule}"


# ---------------------------------------------------------------- Gopher repetition


def test_gopher_repetition_lines_paragraphs_and_ngrams():
    repeated_para = "\n\n".join([PROSE] * 4)
    assert reason(repeated_para, only("gopher_repetition")) == "gopher_repetition.max_dup_para_ratio"
    lines = "\n".join(["same line repeated again"] * 6 + ["one different line here"])
    assert reason(lines, only("gopher_repetition", max_dup_para_ratio=None, max_dup_para_char_ratio=None)) == \
        "gopher_repetition.max_dup_line_ratio"
    ngram_spam = PROSE + " " + " ".join(["buy cheap pills now"] * 30)
    got = reason(ngram_spam, only("gopher_repetition"))
    assert got.startswith("gopher_repetition.") and "gram" in got


# ---------------------------------------------------------------- C4


def test_c4_rules():
    assert reason(PROSE + " Lorem ipsum dolor sit amet.", only("c4")) == "c4.lorem_ipsum"
    assert reason(PROSE + " {", only("c4")) == "c4.curly_brace"
    assert reason("no punctuation here\nnor here", only("c4")) == "c4.no_lines_left"
    assert reason("One sentence only here.", only("c4")) == "c4.min_sentences"


def test_c4_line_filter_edits_kept_documents():
    text = PROSE + "\nMenu Home About\nPlease enable JavaScript to view this page."
    cleaned = clean_document({"id": "d", "text": text, "source": "s", "content_type": "text/plain"}, only("c4"))[0]
    assert cleaned["text"] == PROSE


# ---------------------------------------------------------------- FineWeb


def test_fineweb_rules():
    no_punct = "\n".join(f"line number {i} without a final mark of any kind at all" for i in range(10))
    assert reason(no_punct, only("fineweb")) == "fineweb.min_line_punct_ratio"
    short = "\n".join(["Short one.", "Tiny.", "Small.", "Little.", PROSE])
    assert reason(short, only("fineweb", min_line_punct_ratio=None)) == "fineweb.max_short_line_ratio"
    dup = "\n".join([PROSE, "This exact line repeats twice in the page.", "This exact line repeats twice in the page."])
    assert reason(dup, only("fineweb")) == "fineweb.max_dup_line_char_ratio"
    newlines = "\n".join(f"word{i}." for i in range(40))
    assert reason(newlines, only("fineweb", max_short_line_ratio=None)) == "fineweb.max_newline_word_ratio"


# ---------------------------------------------------------------- the stage


def test_clean_stage_reconciles_and_reports_every_rule(workspace: Path, tmp_path: Path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "good.txt").write_text(PROSE)
    (folder / "short.txt").write_text("Too short.")
    (folder / "page.html").write_text(f"<html><body><p>{PROSE}</p><script>evil()</script></body></html>")
    (folder / "bad.txt").write_text(PROSE + " fuck")
    cfg = load_config("web", [f"workspace={workspace}", f"ingest.sources=[{{kind: files, path: '{folder}'}}]"])
    ingested, _ = run_direct(ingest.STAGE, cfg)
    cleaned, _ = run_direct(clean.STAGE, cfg, {"ingest": ingested})
    counts = cleaned.manifest["counts"]
    assert counts["documents_in"] == 4
    assert counts["documents_out"] + counts["documents_rejected"] == 4
    assert counts["rejected_by_reason"] == {"gopher_quality.min_words": 1, "harmful_content": 1}
    kept = read_group(cleaned, "kept")
    assert sorted(kept.id) == ["good.txt", "page.html"]
    assert "evil" not in kept[kept.id == "page.html"].text.iloc[0]
    rules = cleaned.manifest["details"]["rules"]
    assert rules["gopher_quality.min_words"]["would_remove_fraction"] == 0.25
    assert {"fineweb.max_newline_word_ratio", "c4.curly_brace", "gopher_repetition.dup_5gram_char_ratio"} <= set(rules)
    rejected = read_group(cleaned, "rejected")
    assert set(rejected.reason) == {"gopher_quality.min_words", "harmful_content"}
    assert (cleaned.path / "samples" / "rejected.jsonl").read_text().count("\n") == 2


def test_tiny_defaults_keep_most_of_the_builtin_corpus(workspace: Path):
    cfg = load_config("tiny", [f"workspace={workspace}", "ingest.sources=[{kind: builtin, limit: 60}]"])
    ingested, _ = run_direct(ingest.STAGE, cfg)
    cleaned, _ = run_direct(clean.STAGE, cfg, {"ingest": ingested})
    assert cleaned.manifest["metrics"]["kept_fraction"] > 0.75
