"""Advanced matching: normalise and SHA-256 hash email, phone and external_id the way TikTok expects.

Pure functions, no I/O and no logging: raw email and phone numbers must never reach the logs or the
database, so callers keep only what this module returns (hashes) plus the names of dropped fields.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

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
