"""What a product may hold: the one set of field limits and checks every entry point uses.

The CSV and folder readers, the HTTP API (form fields and JSON bodies), the Python API and the
store itself all call these functions, so a value refused by one is refused by all, with the
same message. Every refusal is a :class:`FieldError`, a CatalogError (an HTTP 400, a CLI
error line).

- **skus** are normalised to NFC and stripped; control, format, private-use, unassigned,
  surrogate and separator characters other than the plain space are refused, so ``T1`` and
  ``T1`` + U+200B (or a decomposed accent) cannot become two products.
- **text fields** (title, url, currency, category) refuse control characters (NUL, ESC, C1,
  line/paragraph separators, surrogates) and the bidi overrides that reorder what is around
  them on screen.
- **blank** values (:func:`is_blank`: only whitespace, invisible characters such as U+200B
  or U+FEFF, or combining marks with no letter to sit on) count as empty: a blank sku is
  refused, a blank text field reads as ``""``, as if it had been sent empty.
- **attributes** are a JSON object, nested at most ``attributes_depth`` deep (the object
  itself is depth 1) and at most ``attributes_chars`` characters as compact JSON; integers fit
  in 64 bits and floats are finite, so every JSON reader (and the service's own serialiser,
  which gives up near depth 255) can read them back.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from snapshop.errors import FieldError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FieldLimits:
    """Longest accepted value of each product field (characters)."""

    sku: int = 200
    title: int = 500
    url: int = 2000
    currency: int = 8
    category: int = 200
    attributes_chars: int = 20_000  # compact JSON, as sent in a form field or as stored
    attributes_depth: int = 16  # {"a": [1]} is depth 2

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


LIMITS = FieldLimits()
TEXT_FIELDS = ("title", "url", "currency", "category")
MAX_ATTRIBUTE_INT = 2**63 - 1  # what SQLite, JavaScript's BigInt and most JSON readers hold

# Bidi embeddings, overrides and isolates: they reorder the text around them on screen.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_TEXT_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_SKU_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
# What shows nothing on its own (besides whitespace): format characters (U+200B, U+2060,
# U+FEFF, the joiners) and combining marks (U+0301, variation selectors), which need a letter.
_BLANK_CATEGORIES = frozenset({"Cf", "Mn", "Me"})
# Letters and symbols whose glyph is empty (Hangul fillers, the blank braille cell): the
# usual way to fake an empty name where only "real" characters are accepted.
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# A JSON string (escapes included) or one bracket: enough to measure nesting without parsing.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _describe(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}" + (f" {name}" if name else "")


def _preview(text: str) -> str:
    return ascii(text[:80])  # escapes what it quotes: the message itself stays printable


def has_control_characters(text: str) -> bool:
    """True if ``text`` holds a character no product text field may hold (see module doc)."""
    return _first_refused_text_char(text) is not None


def _first_refused_text_char(text: str) -> str | None:
    for ch in text:
        if unicodedata.category(ch) in _TEXT_REFUSED_CATEGORIES or ch in _BIDI_CONTROLS:
            return ch
    return None


SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(text: object) -> bool:
    """Whether ``text`` is a sha256 as the catalog stores it: 64 lowercase hex digits (it
    names files: anything else could name one outside the catalog)."""
    return isinstance(text, str) and SHA256.fullmatch(text) is not None


MAX_POSITION = 64  # characters of a garment position ("upper", "lower", a detector's own)


def crop_position_problem(position: object) -> str | None:
    """Why ``position`` cannot be a crop's garment position, None when it can. It names the
    position's index file (``index/crops-<position>.faiss``, and its card beside it), so it
    is one plain part of a file name: a path separator or a leading dot (``../../catalog``)
    would write the index over any ``.faiss`` or ``.json`` file, the catalog card included."""
    if not isinstance(position, str):
        return f"must be text, not {type(position).__name__}"
    if not position or len(position) > MAX_POSITION or len(position.encode(errors="replace")) > 200:
        return f"must be 1 to {MAX_POSITION} characters, at most 200 bytes (it names a file)"
    if "/" in position or "\\" in position or position.startswith("."):
        return "must not hold a path separator or begin with a dot (it names a file)"
    if _first_refused_text_char(position) is not None or position != position.strip():
        return "must not hold control characters or begin or end with a space"
    return None


def is_blank(text: str) -> bool:
    """True if ``text`` shows nothing: it holds no character but whitespace, invisible ones
    and combining marks. Text with one visible character is not blank, so emoji sequences
    (U+200D joins 👩‍💻) and joiners or direction marks inside words are ordinary text."""
    return all(
        ch.isspace() or unicodedata.category(ch) in _BLANK_CATEGORIES or ch in _BLANK_GLYPHS
        for ch in text
    )


def lookup_sku(sku: object) -> str:
    """The form of ``sku`` the store keys products by (NFC, stripped), for lookups: a sku that
    could never be stored simply finds nothing."""
    return unicodedata.normalize("NFC", str(sku)).strip()


def sku_forms(sku: object) -> list[str]:
    """The stored forms a lookup of ``sku`` matches: its lookup form first, then, where it
    differs, its decomposed (NFD) form, which stores written before skus were normalised
    (2026-12-03) may hold (a folder name from macOS, say)."""
    key = lookup_sku(sku)
    legacy = unicodedata.normalize("NFD", key)
    return [key] if legacy == key else [key, legacy]


def normalise_sku(sku: object) -> str:
    """``sku`` as stored (NFC, stripped), or FieldError if no product may have it."""
    if not isinstance(sku, str):
        raise FieldError(f"product id (sku) must be text, got {type(sku).__name__}")
    sku = lookup_sku(sku)
    if is_blank(sku):
        raise FieldError("product id (sku) must not be empty or blank")
    if len(sku) > LIMITS.sku:
        raise FieldError(
            f"product id (sku) {_preview(sku)}... is {len(sku)} characters, limit {LIMITS.sku}"
        )
    for ch in sku:
        if unicodedata.category(ch) in _SKU_REFUSED_CATEGORIES and ch != " ":
            raise FieldError(
                f"product id (sku) {_preview(sku)} contains {_describe(ch)}: control characters,"
                " invisible (format) characters and separators other than a plain space are"
                " not allowed in skus"
            )
    return sku


def check_text(name: str, value: object) -> str:
    """``value`` of text field ``name`` (title, url, currency, category), or FieldError; a
    blank value (:func:`is_blank`) is ``""``."""
    if not isinstance(value, str):
        raise FieldError(f"product {name} must be text, got {type(value).__name__}")
    limit = getattr(LIMITS, name)
    if len(value) > limit:
        raise FieldError(f"product {name} is {len(value)} characters, limit {limit}")
    bad = _first_refused_text_char(value)
    if bad is not None:
        raise FieldError(
            f"product {name} {_preview(value)} contains {_describe(bad)}: control characters"
            " (tabs and line breaks included) and bidi overrides are not allowed"
        )
    return "" if is_blank(value) else value


def check_product_url(url: str) -> str:
    """``url`` if the web page may link to it: an absolute http(s) address, or "" for none.
    Any other scheme (``javascript:``, ``data:``) would run in the page of whoever clicks."""
    url = check_text("url", url).strip()
    if url == "":
        return url
    if any(ch.isspace() for ch in url):
        raise FieldError(f"product url {_preview(url)} contains spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise FieldError(f"product url {_preview(url)} must be an http:// or https:// address")
    return url


def check_price(value: object) -> float:
    """A price: a finite number >= 0 (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError(f"product price must be a number, got {type(value).__name__}")
    price = float(value)
    if not math.isfinite(price) or price < 0:
        raise FieldError(f"product price {value!r} must be a finite number >= 0")
    return price


def _attribute_problem(value: Any, depth: int, limit: int) -> str | None:
    """Why ``value`` (at nesting ``depth``) is not storable JSON, or None."""
    if isinstance(value, dict | list):
        if depth > limit:
            return f"nested deeper than {limit} levels"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(value, dict):
                if not isinstance(key, str):
                    return f"key {key!r} is not text"
                if _has_surrogate(key):
                    return f"key {_preview(key)} holds an unpaired surrogate"
            problem = _attribute_problem(item, depth + 1, limit)
            if problem:
                return problem
        return None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        if abs(value) > MAX_ATTRIBUTE_INT:
            return "an integer does not fit in 64 bits"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} is not a JSON number"
    if isinstance(value, str):
        if _has_surrogate(value):
            return f"string {_preview(value)} holds an unpaired surrogate"
        return None
    return f"{type(value).__name__} is not a JSON value"


def _has_surrogate(text: str) -> bool:
    """Unpaired surrogates (from a JSON ``"\\ud800"``) cannot be encoded as UTF-8."""
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def check_attributes(value: object) -> dict[str, Any]:
    """``value`` if it may be stored as a product's attributes, or FieldError."""
    if not isinstance(value, dict):
        raise FieldError(f"product attributes must be a JSON object, got {type(value).__name__}")
    problem = _attribute_problem(value, 1, LIMITS.attributes_depth)
    if problem:
        raise FieldError(f"product attributes must be plain JSON values: {problem}")
    size = len(_compact_json(value))
    if size > LIMITS.attributes_chars:
        raise FieldError(
            f"product attributes are {size} characters as JSON, limit {LIMITS.attributes_chars}"
        )
    return value


def attributes_json(value: object) -> str:
    """Checked attributes as stored (ASCII JSON: an escaped character survives any codec)."""
    return json.dumps(check_attributes(value), separators=(",", ":"), allow_nan=False)


def json_nesting(text: str) -> int:
    """Deepest bracket nesting of JSON ``text`` (brackets inside strings ignored); measured
    without parsing, so a text that would exhaust the parser's recursion is refused first."""
    depth = deepest = 0
    for token in _JSON_TOKEN.finditer(text):
        mark = token.group()
        if mark in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif mark in "]}":
            depth -= 1
    return deepest


def parse_attributes(text: str) -> dict[str, Any]:
    """Attributes sent as JSON text (a form field, a CSV cell): checked before and after
    parsing, so no text makes the parser recurse too deep or convert a huge integer."""
    if len(text) > LIMITS.attributes_chars:
        raise FieldError(f"attributes are {len(text)} characters, limit {LIMITS.attributes_chars}")
    if json_nesting(text) > LIMITS.attributes_depth:
        raise FieldError(
            f"product attributes must be plain JSON values: nested deeper than"
            f" {LIMITS.attributes_depth} levels"
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FieldError(f"attributes is not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer beyond Python's digit limit
        raise FieldError(f"attributes is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FieldError("attributes must be a JSON object")
    return check_attributes(value)


def stored_attributes(text: str | None, product_id: int) -> dict[str, Any]:
    """A stored row's attributes for reading. A value no current version would write (too deep
    to serialise, not JSON: rows from older versions) reads as ``{}`` with a warning, so one
    bad row never fails the reads around it; the next attributes written replace it."""
    if not text:
        return {}
    problem: str | None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        problem = f"not readable JSON ({str(exc)[:80]})"
    else:
        if not isinstance(value, dict):
            problem = "not a JSON object"
        elif not _may_be_unservable(text):
            return value
        else:
            problem = _attribute_problem(value, 1, LIMITS.attributes_depth)
            if problem is None:
                return value  # over today's size limit is still safe to serve: kept
    if product_id not in _warned:
        _warned.add(product_id)
        log.warning(
            "product %d: stored attributes ignored (%s, %d characters); they read as {}"
            " until new attributes are written",
            product_id, problem, len(text),
        )  # fmt: skip
    return {}


_warned: set[int] = set()  # product ids already warned about, once per process


def _may_be_unservable(text: str) -> bool:
    """Whether stored JSON ``text`` could be too deep or hold an unpaired surrogate; reads are
    hot, so only such text is walked. Stored text is ASCII JSON: a surrogate is a ``\\ud..``
    escape, and nesting deeper than the limit needs more brackets than the limit."""
    brackets = text.count("[") + text.count("{")
    return brackets > LIMITS.attributes_depth or "\\ud" in text or "\\uD" in text


def check_product_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Checked copy of product ``fields`` (title, url, price, currency, category, attributes);
    None values mean "not given" and pass through. Unknown names are refused."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None:
            out[name] = None
        elif name == "url":
            out[name] = check_product_url(value)
        elif name in TEXT_FIELDS:
            out[name] = check_text(name, value)
        elif name == "price":
            out[name] = check_price(value)
        elif name == "attributes":
            out[name] = check_attributes(value)
        else:
            raise FieldError(f"unknown product field {name!r}")
    return out
