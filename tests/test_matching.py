"""Tests for bridge.matching: TikTok's published hashing vectors plus property tests of the rules."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from urllib.parse import quote, quote_plus

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberFormat

from bridge.matching import (
    SHA256_HEX,
    HashedIdentifiers,
    hash_email,
    hash_external_id,
    hash_identifiers,
    hash_phone,
    is_hashed,
    normalize_email,
    normalize_external_id,
    normalize_phone,
    scrub_url,
    sha256_hex,
)

# Vectors from TikTok's Events API documentation.
EMAIL_RAW = " ALICE_abc@gmail.com "
EMAIL_HASH = "848a771458438fc2ec420560d769fb9b9b86851ee338ec56517baabd79d3bb4f"
PHONE_RAW = "(+1)2133734253"
PHONE_HASH = "9f7ec22d72092cd3c0b58726ed9c2d91b92e51a3f29837508fb2948bb22dd2fd"
EXTERNAL_ID_RAW = "user_123"
EXTERNAL_ID_HASH = "80fba0ae1c48e3978e43e4efc365e14e12ea0c830ba8ba5b9a2dafc7e3f2ab8b"

# Modest example counts: the suite has to stay fast on a 2-core CI box.
FAST = settings(max_examples=60, deadline=None)

hex_digests = st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)


def _is_lower_hex_digest(value: str | None) -> bool:
    return value is not None and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# --- TikTok's reference vectors -------------------------------------------------------------------


def test_email_vector_from_tiktok_is_trimmed_lowercased_and_hashed() -> None:
    assert normalize_email(EMAIL_RAW) == "alice_abc@gmail.com"
    assert hash_email(EMAIL_RAW) == EMAIL_HASH


def test_phone_vector_from_tiktok_is_hashed_in_e164_with_plus() -> None:
    assert normalize_phone(PHONE_RAW, "US") == "+12133734253"
    assert hash_phone(PHONE_RAW, "US") == PHONE_HASH


def test_phone_vector_does_not_depend_on_default_region_when_country_code_given() -> None:
    assert hash_phone(PHONE_RAW, "DE") == PHONE_HASH
    assert hash_phone(PHONE_RAW, "") == PHONE_HASH


def test_phone_hash_differs_from_the_common_mistake_of_dropping_the_plus() -> None:
    assert sha256_hex("12133734253") != PHONE_HASH


def test_external_id_vector_from_tiktok_is_hashed() -> None:
    assert hash_external_id(EXTERNAL_ID_RAW) == EXTERNAL_ID_HASH


def test_hash_identifiers_hashes_all_three_vectors() -> None:
    result = hash_identifiers(EMAIL_RAW, PHONE_RAW, EXTERNAL_ID_RAW, "US")
    assert result == HashedIdentifiers(email=EMAIL_HASH, phone=PHONE_HASH, external_id=EXTERNAL_ID_HASH)


# --- primitives -----------------------------------------------------------------------------------


def test_sha256_hex_is_lowercase_hex_of_utf8() -> None:
    assert sha256_hex("é") == hashlib.sha256("é".encode()).hexdigest()
    assert sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_is_hashed_accepts_64_hex_in_either_case() -> None:
    assert is_hashed(EMAIL_HASH)
    assert is_hashed(EMAIL_HASH.upper())
    assert SHA256_HEX.pattern == r"^[A-Fa-f0-9]{64}$"


@pytest.mark.parametrize(
    "value",
    [EMAIL_HASH[:63], EMAIL_HASH + "0", EMAIL_HASH[:63] + "g", EMAIL_HASH + "\n", "", "user_123"],
)
def test_is_hashed_rejects_anything_but_exactly_64_hex(value: str) -> None:
    assert not is_hashed(value)


# --- email ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["", "   ", "\t\n", "not-an-email", "alice.example.com"])
def test_normalize_email_rejects_blank_or_at_less_input(raw: str) -> None:
    assert normalize_email(raw) is None
    assert hash_email(raw) is None


@FAST
@given(st.text(max_size=40))
def test_normalize_email_is_idempotent(raw: str) -> None:
    once = normalize_email(raw)
    if once is not None:
        assert normalize_email(once) == once


@FAST
@given(st.emails())
def test_email_hash_ignores_case_and_surrounding_whitespace(email: str) -> None:
    assert hash_email(f"  {email.upper()}\t") == hash_email(email) == sha256_hex(email.lower())


# --- phone ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "region"),
    [
        ("+1 213-373-4253", "US"),
        ("(213) 373-4253", "US"),
        ("2133734253", "US"),
        ("2133734253", "us"),  # region codes from config may come in lower case
        ("001 213 373 4253", "DE"),  # "00" is Germany's international prefix
        ("011 1 213 373 4253", "US"),  # "011" is the NANP one
        ("+12133734253", "GB"),
        ("(+1)2133734253", "US"),
    ],
)
def test_same_number_in_any_format_gives_the_same_hash(raw: str, region: str) -> None:
    assert normalize_phone(raw, region) == "+12133734253"
    assert hash_phone(raw, region) == PHONE_HASH


def test_international_prefix_00_is_understood() -> None:
    assert normalize_phone("00 44 20 7946 0958", "DE") == "+442079460958"


@FAST
@given(
    st.sampled_from(["+1 213-373-4253", "(213) 373-4253", "001 213 373 4253", "+12133734253"]),
    st.sampled_from(["", " ", "  \t"]),
    st.sampled_from(["", " ", "\n"]),
)
def test_phone_hash_is_stable_across_formats_and_padding(number: str, before: str, after: str) -> None:
    region = "DE" if number.startswith("00") else "US"
    assert hash_phone(f"{before}{number}{after}", region) == PHONE_HASH


# Every region phonenumbers has an example mobile number for: the buyer's number may come from anywhere.
EXAMPLE_NUMBERS = sorted(
    (region, number)
    for region in phonenumbers.SUPPORTED_REGIONS
    if (number := phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE))
)
WRITTEN_FORMATS = (
    PhoneNumberFormat.E164,
    PhoneNumberFormat.INTERNATIONAL,
    PhoneNumberFormat.NATIONAL,
    PhoneNumberFormat.RFC3966,
)


@FAST
@given(st.sampled_from(EXAMPLE_NUMBERS), st.sampled_from(WRITTEN_FORMATS))
def test_any_countrys_number_in_any_written_format_normalises_to_its_e164(
    example: tuple[str, phonenumbers.PhoneNumber], written_format: int
) -> None:
    region, number = example
    e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
    written = phonenumbers.format_number(number, written_format)
    # National formats need the number's own region; the others carry their country code.
    default_region = region if written_format == PhoneNumberFormat.NATIONAL else "US"
    assert normalize_phone(written, default_region) == e164
    assert hash_phone(written, default_region) == sha256_hex(e164)


@pytest.mark.parametrize("raw", ["abc", "12", "", "   ", "+", "+999 123", "2133734253" * 30])
def test_unparseable_or_impossible_phone_gives_none(raw: str) -> None:
    assert normalize_phone(raw, "US") is None
    assert hash_phone(raw, "US") is None


def test_national_number_without_usable_region_gives_none() -> None:
    assert normalize_phone("2133734253", "") is None
    assert normalize_phone("2133734253", "ZZ") is None


@FAST
@given(st.text(max_size=30), st.sampled_from(["US", "DE", "GB", "BR", "IN", "", "ZZ"]))
def test_normalize_phone_never_raises_and_returns_e164_or_none(raw: str, region: str) -> None:
    phone = normalize_phone(raw, region)
    if phone is not None:
        assert phone.startswith("+")
        assert phone[1:].isdigit()
        assert normalize_phone(phone, region) == phone


# --- external_id ----------------------------------------------------------------------------------


def test_external_id_is_trimmed_but_keeps_its_case() -> None:
    assert normalize_external_id("  User_123 ") == "User_123"
    assert hash_external_id("  user_123\n") == EXTERNAL_ID_HASH
    assert hash_external_id("User_123") != EXTERNAL_ID_HASH


@pytest.mark.parametrize("raw", ["", " ", "\t\n"])
def test_blank_external_id_gives_none(raw: str) -> None:
    assert normalize_external_id(raw) is None
    assert hash_external_id(raw) is None


# --- already hashed values and output shape ------------------------------------------------------


@FAST
@given(st.text(max_size=40))
def test_hashing_is_idempotent(raw: str) -> None:
    for hasher in (hash_email, hash_external_id, lambda value: hash_phone(value, "US")):
        once = hasher(raw)
        if once is not None:
            assert hasher(once) == once


@FAST
@given(hex_digests)
def test_already_hashed_value_passes_through_lowercased(digest: str) -> None:
    expected = digest.lower()
    assert hash_email(digest) == expected
    assert hash_phone(digest, "US") == expected
    assert hash_external_id(digest) == expected
    assert hash_email(f" {digest.upper()} ") == expected


def test_upper_case_digest_is_not_hashed_twice() -> None:
    assert hash_email(EMAIL_HASH.upper()) == EMAIL_HASH
    assert hash_phone(PHONE_HASH.upper(), "US") == PHONE_HASH
    assert hash_external_id(EXTERNAL_ID_HASH.upper()) == EXTERNAL_ID_HASH


@FAST
@given(st.text(max_size=40), st.sampled_from(["US", "DE", "GB", ""]))
def test_output_is_always_64_lowercase_hex_or_none(raw: str, region: str) -> None:
    for hashed in (hash_email(raw), hash_phone(raw, region), hash_external_id(raw)):
        assert hashed is None or _is_lower_hex_digest(hashed)


# --- hash_identifiers -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad_phone", ["abc", "12"])
def test_unparseable_phone_is_none_and_reported_as_dropped(bad_phone: str) -> None:
    result = hash_identifiers(EMAIL_RAW, bad_phone, EXTERNAL_ID_RAW, "US")
    assert result.phone is None
    assert result.dropped == ("phone",)
    assert result.email == EMAIL_HASH
    assert result.external_id == EXTERNAL_ID_HASH


def test_missing_or_blank_identifiers_are_not_reported_as_dropped() -> None:
    assert hash_identifiers(None, None, None, "US") == HashedIdentifiers()
    assert hash_identifiers("", "  ", "\t", "US") == HashedIdentifiers()


def test_every_unusable_identifier_is_dropped_in_field_order() -> None:
    result = hash_identifiers("no-at-sign", "abc", None, "US")
    assert result == HashedIdentifiers(dropped=("email", "phone"))


def test_hash_identifiers_uses_default_region_for_national_numbers() -> None:
    assert hash_identifiers(None, "(213) 373-4253", None, "US").phone == PHONE_HASH
    assert hash_identifiers(None, "(213) 373-4253", None, "").dropped == ("phone",)


def test_hashed_identifiers_carry_no_raw_values() -> None:
    result = hash_identifiers(EMAIL_RAW, PHONE_RAW, EXTERNAL_ID_RAW, "US")
    text = repr(result)
    assert "alice" not in text.lower()
    assert "2133734253" not in text
    assert "user_123" not in text


@FAST
@given(
    st.one_of(st.none(), st.text(max_size=30), st.emails()),
    st.one_of(st.none(), st.text(max_size=20), st.just("+1 213-373-4253")),
    st.one_of(st.none(), st.text(max_size=20)),
)
def test_hash_identifiers_agrees_with_individual_hashers(
    email: str | None, phone: str | None, external_id: str | None
) -> None:
    result = hash_identifiers(email, phone, external_id, "US")
    expected_dropped = []
    for name, raw, hashed, individual in (
        ("email", email, result.email, hash_email),
        ("phone", phone, result.phone, lambda value: hash_phone(value, "US")),
        ("external_id", external_id, result.external_id, hash_external_id),
    ):
        if raw is None or not raw.strip():
            assert hashed is None
            continue
        assert hashed == individual(raw)
        if hashed is None:
            expected_dropped.append(name)
    assert result.dropped == tuple(expected_dropped)


# --- page URLs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://lp.example/offer",
        "https://lp.example/offer?ttclid=E.C.P.CqgBqkM2fX&subid=1dad2cg1br22spja1",
        "https://lp.example/p?q=a+b%20c&hotel=2&is_mobile=1&handle=%40someone",
        # Digits alone are ids, prices and timestamps; a '+' before a few digits is a sign.
        "https://lp.example/p?ad=1790000000000000001&ts=1764000000&price=%2B5&q=size+10",
        # A '+' after a letter or digit is an encoded space or part of a token, not a phone number's.
        "https://lp.example/p?utm_campaign=US+Lead+2024-05-15&c=Spring+Sale+20240515&p=Promo+05.15.2024",
        "https://lp.example/p?q=order+12345678&utm_content=ad+1234567890&adset=Broad+18-65+2405151",
        "https://lp.example/c/men+2024-05-15/item?sig=abc%2B12345678xyz",
    ],
)
def test_url_without_email_or_phone_is_kept_exactly(url: str) -> None:
    assert scrub_url(url) == url


@pytest.mark.parametrize(
    ("url", "scrubbed"),
    [
        ("https://lp.example/t?step=2&email=a%40b.co", "https://lp.example/t?step=2"),
        ("https://lp.example/t?User_Email=x&Phone=%2B1213&tel=1&mobile=2&a=1", "https://lp.example/t?a=1"),
        ("https://lp.example/t?contact=alice@example.com", "https://lp.example/t"),
        ("https://lp.example/t?next=%2Fok%3Fe%3Dbob%2540example.org&x=1", "https://lp.example/t?x=1"),
        ("https://lp.example/t?a=1#email=alice@example.com", "https://lp.example/t?a=1"),
        ("https://lp.example/u/alice@example.com/thanks", None),
        # Phone numbers in international format, whatever the parameter is called, however encoded.
        ("https://lp.example/t?a=1&n=%2B14155550100", "https://lp.example/t?a=1"),
        ("https://lp.example/t?n=%252B14155550100&a=1", "https://lp.example/t?a=1"),
        ("https://lp.example/t?n=+14155550100&a=1", "https://lp.example/t?a=1"),
        ("https://lp.example/t?c=%2B44%20(20)%207946-0958&a=1", "https://lp.example/t?a=1"),
        ("https://lp.example/t?next=%2Fok%3Fn%3D%252B4930901820&a=1", "https://lp.example/t?a=1"),
        # Without the country code only the parameter's name says it is a phone number.
        ("https://lp.example/t?ph=4155550100&wa=4155550100&a=1", "https://lp.example/t?a=1"),
        ("https://lp.example/call/+14155550100", None),
        ("", None),
        (None, None),
    ],
)
def test_email_and_phone_parameters_are_removed_from_urls(url: str | None, scrubbed: str | None) -> None:
    assert scrub_url(url) == scrubbed


@FAST
@given(st.emails(), st.sampled_from([quote, quote_plus, lambda text: text]), st.text(max_size=8))
def test_no_email_survives_in_a_scrubbed_url(email: str, encode: Callable[[str], str], name: str) -> None:
    query = f"a=1&{quote(name)}={encode(email)}&b=2"
    scrubbed = scrub_url(f"https://lp.example/t?{query}")
    assert scrubbed is None or email.lower() not in scrubbed.lower()
    assert scrubbed is None or scrubbed.startswith("https://lp.example/t?a=1")


@pytest.mark.parametrize("style", [PhoneNumberFormat.E164, PhoneNumberFormat.INTERNATIONAL])
@pytest.mark.parametrize("encode", [quote, quote_plus, lambda text: text], ids=["quote", "quote_plus", "raw"])
def test_no_international_phone_number_survives_in_a_scrubbed_url(
    style: int, encode: Callable[[str], str]
) -> None:
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):  # every country's example mobile number
        number = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
        if number is None:
            continue
        written = phonenumbers.format_number(number, style)
        scrubbed = scrub_url(f"https://lp.example/t?a=1&n={encode(written)}&b=2")
        assert scrubbed == "https://lp.example/t?a=1&b=2", (region, written)
