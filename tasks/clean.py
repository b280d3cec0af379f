"""clean: normalise text, strip HTML, drop harmful and low-quality documents by explicit rules.

Per document, in order:
  1. Unicode: ftfy mojibake repair (configured to leave quotes, HTML entities and code alone), NFC,
     control characters and NUL removed, newlines normalised to "\\n".
  2. HTML -> text with resiliparse (paragraphs, line breaks and <pre> indentation kept; script,
     style and comments dropped) for documents from .html files or that start like an HTML page.
  3. Harmful content: words from the badwords-py list (LDNOOBW superset) shipped in the package.
  4. Quality rules, each with its own threshold (None switches a rule off):
     Gopher quality and repetition (Rae et al. 2021), C4 (Raffel et al. 2020), FineWeb (Penedo et al.
     2024). The schema defaults are the papers' values (configs/web.yaml); configs/tiny.yaml relaxes
     the ones that would gut the built-in corpus (short technical docstrings with code).

A document is rejected by the first enabled rule it fails (its reason, e.g. `gopher_quality.min_words`).
Every rule is also evaluated independently on every document, so the manifest reports, per rule,
the fraction of documents it alone would remove — the numbers to look at before changing a default.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from itertools import accumulate
from pathlib import Path
from typing import Callable

import ftfy

from typing import Literal
from pydantic import Field, model_validator

from jielong.tasks.core.schema import Strict, UserError
from jielong.tasks.core.contract import Stage, StageContext, StageResult
from jielong.tasks.core.shards import DOC_SCHEMA, REJECT_SCHEMA, ShardSize, ShardWriter, read_rows, reject, shard_size_of, utf8_len



# ---------------------------------------------------------------- config section


class NormalizeConfig(Strict):
    fix_mojibake: bool = True  # ftfy, configured not to touch quotes, entities or code
    form: Literal["NFC", "NFKC", "none"] = "NFC"


class HtmlConfig(Strict):
    # auto: extract documents ingested from .html/.htm files or that start like an HTML page
    mode: Literal["auto", "always", "never"] = "auto"


class HarmfulConfig(Strict):
    enabled: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"])
    max_matches: int = Field(0, ge=0, description="reject when more blocklisted words than this")
    allow_words: list[str] = Field(default_factory=list, description="list entries not to count, e.g. 'xxx' in code")

    @model_validator(mode="after")
    def _lists_exist(self) -> "HarmfulConfig":
        from importlib import resources

        base = resources.files("badwords") / "resource" / "words"
        missing = [lang for lang in self.languages if not (base / f"{lang}.txt").is_file()]
        if missing:
            available = sorted(p.name[:-4] for p in base.iterdir() if p.name.endswith(".txt"))
            raise ValueError(f"no word list for {', '.join(map(repr, missing))}; available: {', '.join(available)}")
        return self


class GopherQualityConfig(Strict):
    """Rae et al. 2021 (Gopher), quality rules. Defaults are the published values (configs/web.yaml);
    every threshold can be set to null to switch that one rule off."""

    enabled: bool = True
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2


class GopherRepetitionConfig(Strict):
    enabled: bool = True
    max_dup_line_ratio: float | None = 0.3
    max_dup_para_ratio: float | None = 0.3
    max_dup_line_char_ratio: float | None = 0.2
    max_dup_para_char_ratio: float | None = 0.2
    max_top_ngram_char_ratio: dict[int, float] | None = Field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    max_dup_ngram_char_ratio: dict[int, float] | None = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )


class C4Config(Strict):
    """Raffel et al. 2020 (C4). `filter_lines` removes lines (it edits documents) before the checks."""

    enabled: bool = True
    filter_lines: bool = True  # drop lines without terminal punctuation, < min_line_words, "javascript"
    min_line_words: int | None = 3
    min_sentences: int | None = 5
    reject_lorem_ipsum: bool = True
    reject_curly_brace: bool = True
    reject_javascript_lines: bool = True  # only with filter_lines


class FineWebConfig(Strict):
    """Penedo et al. 2024 (FineWeb) extra quality rules."""

    enabled: bool = True
    min_line_punct_ratio: float | None = 0.12
    max_short_line_ratio: float | None = 0.67
    short_line_chars: int = 30
    max_dup_line_char_ratio: float | None = 0.01
    max_newline_word_ratio: float | None = 0.3


class CleanConfig(Strict):
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    html: HtmlConfig = Field(default_factory=HtmlConfig)
    harmful: HarmfulConfig = Field(default_factory=HarmfulConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)


VERSION = "1"

# ---------------------------------------------------------------- 1. Unicode normalisation

_FTFY = ftfy.TextFixerConfig(
    unescape_html=False,  # "&lt;" in a docstring is content, not markup
    uncurl_quotes=False,
    fix_latin_ligatures=False,
    fix_character_width=False,
    normalization=None,  # done below, as configured
    explain=False,
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def normalize(text: str, cfg: CleanConfig) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.normalize.fix_mojibake:
        text = ftfy.fix_text(text, _FTFY)
    if cfg.normalize.form != "none":
        text = unicodedata.normalize(cfg.normalize.form, text)
    text = _CONTROL.sub("", text)
    return text.strip("\n").rstrip()


# ---------------------------------------------------------------- 2. HTML

_HTML_START = re.compile(r"^\s*(<!--.*?-->\s*)*<(!doctype\s+html|html[\s>])", re.IGNORECASE | re.DOTALL)


def looks_like_html(doc: dict, cfg: CleanConfig) -> bool:
    if cfg.html.mode == "never":
        return False
    if cfg.html.mode == "always":
        return True
    return doc.get("content_type") == "text/html" or bool(_HTML_START.match(doc["text"][:4096]))


def html_to_text(html: str) -> str:
    from resiliparse.extract.html2text import extract_plain_text

    text = extract_plain_text(html, preserve_formatting=True, main_content=False, alt_texts=False)
    return text.strip("\n").rstrip()


# ---------------------------------------------------------------- 3. harmful content


@lru_cache(maxsize=8)
def blocklist(languages: tuple[str, ...]) -> tuple[frozenset[str], frozenset[tuple[str, ...]]]:
    """Single words and multi-word phrases from badwords-py's shipped lists (no download)."""
    words: set[str] = set()
    phrases: set[tuple[str, ...]] = set()
    base = resources.files("badwords") / "resource" / "words"
    for language in languages:
        entry = base / f"{language}.txt"
        if not entry.is_file():
            available = sorted(p.name[:-4] for p in base.iterdir() if p.name.endswith(".txt"))
            raise UserError(f"clean.harmful.languages: no list for {language!r}; available: {', '.join(available)}")
        for line in entry.read_text(encoding="utf-8").splitlines():
            tokens = tuple(_WORD.findall(line.lower()))
            if len(tokens) == 1:
                words.add(tokens[0])
            elif tokens:
                phrases.add(tokens)
    return frozenset(words), frozenset(phrases)


_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)


def harmful_matches(text: str, languages: tuple[str, ...], allow: frozenset[str] = frozenset()) -> list[str]:
    words, phrases = blocklist(languages)
    tokens = _WORD.findall(text.lower())
    found = [t for t in tokens if t in words and t not in allow]
    present = set(tokens)
    starts: dict[str, list[int]] | None = None  # token -> its positions, built once a phrase may occur
    for phrase in phrases:
        if not present.issuperset(phrase):
            continue
        if starts is None:
            starts = defaultdict(list)
            for i, token in enumerate(tokens):
                starts[token].append(i)
        n = len(phrase)
        found += [" ".join(phrase) for i in starts[phrase[0]] if tuple(tokens[i : i + n]) == phrase]
    return found


# ---------------------------------------------------------------- 4. quality rules

_PUNCT_CHARS = string.punctuation + "…–—“”‘’"
_STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "※", "·", "‣", "⁃", "- ", "* ")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "…")
_C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


@dataclass
class Verdict:
    rule: str  # "<family>.<rule>"
    failed: bool
    value: float


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, characters in them)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    counts = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    if not counts:
        return 0
    top, freq = counts.most_common(1)[0]
    return len(top) * freq if freq > 1 else 0


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters of words covered by n-grams seen earlier in the document (Gopher, as DataTrove): from
    left to right, an n-gram seen before counts its characters and the scan jumps past it."""
    grams = list(zip(*(words[k:] for k in range(n))))
    if len(set(grams)) == len(grams):
        return 0  # no n-gram repeats (the usual case), decided without the scan
    ends = list(accumulate(map(len, words), initial=0))  # characters of words[:i] at ends[i]
    seen: set[tuple[str, ...]] = set()
    chars = i = 0
    while i < len(grams):
        if grams[i] in seen:
            chars += ends[i + n] - ends[i]
            i += n
        else:
            seen.add(grams[i])
            i += 1
    return chars


def gopher_quality(text: str, cfg) -> list[Verdict]:
    words = text.split()
    content = [w for w in words if w.strip(_PUNCT_CHARS)]  # words not made of punctuation alone
    n = len(content)
    lines = text.splitlines() or [""]
    checks: list[tuple[str, float | None, Callable[[float, float], bool], float]] = [
        ("min_words", cfg.min_words, lambda v, t: v < t, n),
        ("max_words", cfg.max_words, lambda v, t: v > t, n),
    ]
    avg = sum(map(len, content)) / n if n else 0.0
    checks += [
        ("min_avg_word_length", cfg.min_avg_word_length, lambda v, t: v < t, avg),
        ("max_avg_word_length", cfg.max_avg_word_length, lambda v, t: v > t, avg),
        ("max_symbol_word_ratio", cfg.max_symbol_word_ratio, lambda v, t: v > t,
         (text.count("#") + text.count("...") + text.count("…")) / max(n, 1)),
        ("max_bullet_lines_ratio", cfg.max_bullet_lines_ratio, lambda v, t: v > t,
         sum(line.lstrip().startswith(_BULLETS) for line in lines) / len(lines)),
        ("max_ellipsis_lines_ratio", cfg.max_ellipsis_lines_ratio, lambda v, t: v > t,
         sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines)),
        ("min_alpha_words_ratio", cfg.min_alpha_words_ratio, lambda v, t: v < t,
         sum(any(c.isalpha() for c in w) for w in words) / max(len(words), 1)),
        ("min_stop_words", cfg.min_stop_words, lambda v, t: v < t,
         sum(w.strip(string.punctuation).lower() in _STOP_WORDS for w in words)),
    ]
    return [Verdict(f"gopher_quality.{name}", fails(value, thr), value) for name, thr, fails, value in checks if thr is not None]


def gopher_repetition(text: str, cfg) -> list[Verdict]:
    total = max(len(text), 1)
    paragraphs = [p for p in re.split(r"\n{2,}", text.strip()) if p.strip()] or [""]
    lines = [line for line in re.split(r"\n+", text) if line.strip()] or [""]
    dup_par, dup_par_chars = _duplicates(paragraphs)
    dup_lines, dup_line_chars = _duplicates(lines)
    words = _WORD.findall(text.lower())
    out = []
    for name, thr, value in (
        ("max_dup_para_ratio", cfg.max_dup_para_ratio, dup_par / len(paragraphs)),
        ("max_dup_para_char_ratio", cfg.max_dup_para_char_ratio, dup_par_chars / total),
        ("max_dup_line_ratio", cfg.max_dup_line_ratio, dup_lines / len(lines)),
        ("max_dup_line_char_ratio", cfg.max_dup_line_char_ratio, dup_line_chars / total),
    ):
        if thr is not None:
            out.append(Verdict(f"gopher_repetition.{name}", value > thr, value))
    for n, thr in sorted((cfg.max_top_ngram_char_ratio or {}).items()):
        value = _top_ngram_chars(words, n) / total
        out.append(Verdict(f"gopher_repetition.top_{n}gram_char_ratio", value > thr, value))
    for n, thr in sorted((cfg.max_dup_ngram_char_ratio or {}).items()):
        value = _dup_ngram_chars(words, n) / total
        out.append(Verdict(f"gopher_repetition.dup_{n}gram_char_ratio", value > thr, value))
    return out


def c4_filter_lines(text: str, cfg) -> str:
    kept = []
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        lowered = line.lower()
        if (
            not line.endswith(_TERMINAL)
            or len(words) < (cfg.min_line_words or 0)
            or any(len(w) > 1000 for w in words)
            or (cfg.reject_javascript_lines and "javascript" in lowered)
            or any(p in lowered for p in _C4_POLICY)
        ):
            continue
        kept.append(line)
    return "\n".join(kept)


def c4(text: str, cfg, body: str | None = None) -> list[Verdict]:
    """body: the text after c4_filter_lines, when the caller has it already."""
    lowered = text.lower()
    out = [
        Verdict("c4.lorem_ipsum", cfg.reject_lorem_ipsum and "lorem ipsum" in lowered, float("lorem ipsum" in lowered)),
        Verdict("c4.curly_brace", cfg.reject_curly_brace and "{" in text, float("{" in text)),
    ]
    if body is None:
        body = c4_filter_lines(text, cfg) if cfg.filter_lines else text
    if cfg.filter_lines:
        out.append(Verdict("c4.no_lines_left", not body.strip(), float(len(body))))
    if cfg.min_sentences is not None:
        sentences = len(_SENTENCE_END.findall(body))
        out.append(Verdict("c4.min_sentences", sentences < cfg.min_sentences, sentences))
    return out


def fineweb(text: str, cfg) -> list[Verdict]:
    lines = [line for line in text.split("\n") if line.strip()] or [""]
    words = text.split()
    out = []
    for name, thr, fails, value in (
        ("min_line_punct_ratio", cfg.min_line_punct_ratio, lambda v, t: v < t,
         sum(line.rstrip().endswith(_TERMINAL) for line in lines) / len(lines)),
        ("max_short_line_ratio", cfg.max_short_line_ratio, lambda v, t: v > t,
         sum(len(line) <= cfg.short_line_chars for line in lines) / len(lines)),
        ("max_dup_line_char_ratio", cfg.max_dup_line_char_ratio, lambda v, t: v > t,
         _duplicates(lines)[1] / max(len(text.replace("\n", "")), 1)),
        ("max_newline_word_ratio", cfg.max_newline_word_ratio, lambda v, t: v > t,
         text.count("\n") / max(len(words), 1)),
    ):
        if thr is not None:
            out.append(Verdict(f"fineweb.{name}", fails(value, thr), value))
    return out


QUALITY_FAMILIES = (
    ("gopher_quality", gopher_quality),
    ("gopher_repetition", gopher_repetition),
    ("c4", c4),
    ("fineweb", fineweb),
)


def judge(text: str, cfg: CleanConfig) -> tuple[str | None, list[Verdict], str]:
    """(first failing enabled rule or None, every verdict, text after C4 line filtering)."""
    verdicts: list[Verdict] = []
    reason = None
    body = c4_filter_lines(text, cfg.c4) if cfg.c4.filter_lines else text  # filtered once, used twice
    for family, check in QUALITY_FAMILIES:
        family_cfg = getattr(cfg, family)
        results = c4(text, family_cfg, body) if check is c4 else check(text, family_cfg)
        verdicts += results
        if reason is None and family_cfg.enabled:
            reason = next((v.rule for v in results if v.failed), None)
    if reason is None and cfg.c4.enabled:
        text = body
    return reason, verdicts, text


def clean_document(doc: dict, cfg: CleanConfig) -> tuple[dict | None, str | None, str, list[Verdict]]:
    """(cleaned document or None, rejection reason, detail, all quality verdicts)."""
    text = normalize(doc["text"], cfg)
    if looks_like_html(doc, cfg):
        try:
            text = html_to_text(text)
        except Exception as err:  # resiliparse parser errors on hostile markup
            return None, "html_unparseable", f"{type(err).__name__}: {err}", []
    if not text.strip():
        return None, "empty", "nothing left after normalisation/HTML extraction", []
    # quality verdicts are computed even for harmful documents, so each rule's would-remove
    # fraction is over every non-empty document
    reason, verdicts, filtered = judge(text, cfg)
    if cfg.harmful.enabled:
        allow = frozenset(w.lower() for w in cfg.harmful.allow_words)
        found = harmful_matches(text, tuple(cfg.harmful.languages), allow)
        if len(found) > cfg.harmful.max_matches:
            return None, "harmful_content", ", ".join(sorted(set(found))[:10]), verdicts
    if reason:
        value = next(v.value for v in verdicts if v.rule == reason)
        return None, reason, f"value={value:.4g}", verdicts
    return {**doc, "text": filtered, "content_type": "text/plain"}, None, "", verdicts


# ---------------------------------------------------------------- stage


@dataclass
class CleanJob:
    index: int
    path: str
    out_dir: str
    config: dict
    shard_size: ShardSize


def plan(ctx: StageContext) -> list[CleanJob]:
    cfg = ctx.section("clean")
    blocklist(tuple(cfg.harmful.languages))  # fail fast on an unknown language
    files = ctx.inputs["ingest"].files("kept")
    return [CleanJob(i, str(p), str(ctx.out_dir), cfg.model_dump(mode="json"), shard_size_of(ctx.config))
            for i, p in enumerate(files)]


def process(job: CleanJob) -> dict:
    cfg = CleanConfig.model_validate(job.config)
    out = Path(job.out_dir)
    kept = ShardWriter(out, "kept", job.index, DOC_SCHEMA, job.shard_size)
    rejected = ShardWriter(out, "rejected", job.index, REJECT_SCHEMA, job.shard_size)
    reasons: Counter[str] = Counter()
    would_remove: Counter[str] = Counter()
    evaluated: Counter[str] = Counter()
    seen = bytes_in = 0
    for doc in read_rows(Path(job.path)):
        seen += 1
        bytes_in += utf8_len(doc["text"])
        cleaned, reason, detail, verdicts = clean_document(doc, cfg)
        for v in verdicts:
            evaluated[v.rule] += 1
            would_remove[v.rule] += v.failed
        if cleaned is None:
            rejected.add(reject(doc, reason, detail))
            reasons[reason] += 1
        else:
            kept.add(cleaned)
    kept.close()
    rejected.close()
    return {
        "documents_in": seen,
        "documents_out": kept.count,
        "rejected": dict(reasons),
        "bytes_in": bytes_in,
        "bytes_out": kept.bytes,
        "would_remove": dict(would_remove),
        "evaluated": dict(evaluated),
    }


def finalize(ctx: StageContext, results: list[dict]) -> StageResult:
    result = StageResult()
    would_remove: Counter[str] = Counter()
    evaluated: Counter[str] = Counter()
    for r in results:
        result.documents_in += r["documents_in"]
        result.documents_out += r["documents_out"]
        result.bytes_in += r["bytes_in"]
        result.bytes_out += r["bytes_out"]
        for reason, n in r["rejected"].items():
            result.rejected_by_reason[reason] = result.rejected_by_reason.get(reason, 0) + n
        would_remove.update(r["would_remove"])
        evaluated.update(r["evaluated"])
    cfg = ctx.section("clean")
    total = max(result.documents_in, 1)
    report = {}
    for rule in sorted(evaluated):
        family = rule.split(".")[0]
        report[rule] = {
            "family_enabled": getattr(cfg, family).enabled,
            "would_remove_fraction": round(would_remove[rule] / max(evaluated[rule], 1), 4),
            "removed": result.rejected_by_reason.get(rule, 0),
            "removed_fraction": round(result.rejected_by_reason.get(rule, 0) / total, 4),
        }
    result.details["rules"] = report
    result.metrics["kept_fraction"] = result.documents_out / total
    result.metrics["kept_bytes_fraction"] = result.bytes_out / max(result.bytes_in, 1)
    return result


def run(ctx: StageContext) -> StageResult:
    return finalize(ctx, ctx.map(process, plan(ctx)))


STAGE = Stage(
    name="clean",
    version=VERSION,
    reads=("clean", "ingest.shard_size", "ingest.shard_bytes"),  # clean writes shards of ingest's size
    inputs=("ingest",),
    run=run,
)

