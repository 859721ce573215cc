"""Advanced matching: normalise and SHA-256 hash email, phone and external_id the way TikTok expects.

Pure functions, no I/O and no logging: raw email and phone numbers must never reach the logs or the
database, so callers keep only what this module returns (hashes) plus the names of dropped fields.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote_plus

import phonenumbers

SHA256_HEX: re.Pattern[str] = re.compile(r"^[A-Fa-f0-9]{64}$")


def is_hashed(value: str) -> bool:
    """True if `value` already is a SHA-256 hex digest (64 hex characters, either case)."""
    # fullmatch, not match: with `$` alone a trailing newline would still count as hashed.
    return SHA256_HEX.fullmatch(value) is not None


def sha256_hex(value: str) -> str:
    """Lowercase hex SHA-256 of the UTF-8 encoding of `value`."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def normalize_email(raw: str) -> str | None:
    """Trim and lowercase; None if nothing is left or it is clearly not an email address."""
    email = raw.strip().lower()
    if not email or "@" not in email:
        return None
    return email


def normalize_phone(raw: str, default_region: str) -> str | None:
    """E.164 with the leading '+' (TikTok rejects matches hashed without it); None if unusable.

    `default_region` (ISO 3166 alpha-2, e.g. "US") is used for numbers written without a country
    code and decides which international prefix ("00", "011", ...) is recognised.
    """
    # phonenumbers only knows upper-case region codes; an empty region means "international only".
    region = default_region.strip().upper() or None
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    # "Possible" (length fits the country's plan) rather than "valid": valid needs up-to-date
    # range metadata, and rejecting a real new-range number would lose a match for nothing.
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_external_id(raw: str) -> str | None:
    """Trim only (case is significant in an id); None if nothing is left."""
    external_id = raw.strip()
    return external_id or None


def _passthrough(raw: str) -> str | None:
    # Trackers and landing pages often forward identifiers they hashed themselves; hashing those
    # again would produce a value TikTok can never match.
    value = raw.strip()
    return value.lower() if is_hashed(value) else None


def hash_email(raw: str) -> str | None:
    """SHA-256 of the normalised email; an already-hashed value is passed through lowercased."""
    already = _passthrough(raw)
    if already is not None:
        return already
    email = normalize_email(raw)
    return sha256_hex(email) if email is not None else None


def hash_phone(raw: str, default_region: str) -> str | None:
    """SHA-256 of the E.164 phone number; an already-hashed value is passed through lowercased."""
    already = _passthrough(raw)
    if already is not None:
        return already
    phone = normalize_phone(raw, default_region)
    return sha256_hex(phone) if phone is not None else None


def hash_external_id(raw: str) -> str | None:
    """SHA-256 of the trimmed external_id; an already-hashed value is passed through lowercased."""
    already = _passthrough(raw)
    if already is not None:
        return already
    external_id = normalize_external_id(raw)
    return sha256_hex(external_id) if external_id is not None else None


@dataclass(frozen=True)
class HashedIdentifiers:
    """Hashed identifiers ready for the payload's `user` object.

    `dropped` names identifiers that were supplied (non-blank) but could not be used, so callers can
    count the reason without ever seeing or logging the raw value.
    """

    email: str | None = None
    phone: str | None = None
    external_id: str | None = None
    dropped: tuple[str, ...] = ()


def hash_identifiers(
    email: str | None,
    phone: str | None,
    external_id: str | None,
    default_region: str,
) -> HashedIdentifiers:
    """Hash every identifier given; absent or blank ones are simply missing, unusable ones are dropped."""
    dropped: list[str] = []

    def attempt(name: str, raw: str | None, hasher: Callable[[str], str | None]) -> str | None:
        # Blank means "not supplied" (trackers send empty macros), which is not worth reporting.
        if raw is None or not raw.strip():
            return None
        hashed = hasher(raw)
        if hashed is None:
            dropped.append(name)
        return hashed

    return HashedIdentifiers(
        email=attempt("email", email, hash_email),
        phone=attempt("phone", phone, lambda raw: hash_phone(raw, default_region)),
        external_id=attempt("external_id", external_id, hash_external_id),
        dropped=tuple(dropped),
    )


# Query parameters named like these carry an email address or a phone number (`?email=`, `user_phone=`).
_PII_NAME = re.compile(r"e-?mail|phone|^(mail|tel|mobile|msisdn|ph|wa|whatsapp|cell)$", re.IGNORECASE)
# Deliberately loose: anything@domain.tld counts, since a kept address is worse than a lost parameter.
_EMAIL_LIKE = re.compile(r"[^\s@]@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
# A number in international format, whatever the parameter's name: '+' and 7 to 15 digits (Niue's and
# Tokelau's have 7), perhaps grouped by spaces, dots, dashes or brackets. (A number written without its
# country code cannot be told apart from an id or a timestamp by its value; only its parameter's name
# gives it away.)
# Not after a letter or digit, nor before one: in `US+Lead+2024-05-15` or `abc+12345678xyz` the '+' is
# an encoded space or part of a token.
_PHONE_LIKE = re.compile(r"(?<![0-9A-Za-z])\+[\s(]*\d(?:[\s().-]*\d){6,14}(?![0-9A-Za-z])")


def _carries_pii(text: str) -> bool:
    """An email address or an international phone number in `text`, as it is or decoded."""
    # Decoded repeatedly: a URL nested in a parameter is encoded once more (`bob%2540example.com`).
    # Tried before decoding too: there a phone's '+' is still a '+', not the space it decodes to.
    for _ in range(4):
        # The `in` tests spare the regexes most values, which have neither an '@' nor a '+'.
        if ("@" in text and _EMAIL_LIKE.search(text)) or ("+" in text and _PHONE_LIKE.search(text)):
            return True
        decoded = unquote_plus(text)
        if decoded == text:
            return False
        text = decoded
    return False


def scrub_url(url: str | None) -> str | None:
    """A page URL or referrer fit to store and send: no email address or phone number left in it.

    Landing pages pass form fields along in the query (`/thanks?email=...`), so a raw address would
    otherwise reach the database and TikTok's `page.url` unhashed. Parameters named for an email or
    phone, or whose value holds an email address or an international phone number, are removed;
    untouched ones keep their exact encoding. The fragment is dropped (servers never see it, pages
    keep state in it). A URL that still holds either elsewhere (its path) is dropped whole.
    """
    if url is None:
        return None
    base, _, _ = url.partition("#")
    path, sep, query = base.partition("?")
    kept = []
    for part in query.split("&") if sep else ():
        name, _, value = part.partition("=")
        if not part or _PII_NAME.search(unquote_plus(name)) or _carries_pii(value):
            continue
        kept.append(part)
    scrubbed = f"{path}?{'&'.join(kept)}" if kept else path
    if not scrubbed or _carries_pii(scrubbed):
        return None
    return scrubbed
