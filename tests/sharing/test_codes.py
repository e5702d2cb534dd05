"""Security codes and PINs (pockethealth.codes): alphabet, uniformity, typed input,
keyed hashing."""

from collections import Counter

import pytest

from pockethealth.codes import (
    CODE_ALPHABET,
    CODE_LENGTH,
    code_format,
    code_generate,
    code_hash,
    code_is_well_formed,
    code_matches,
    code_normalise,
    code_suffix,
    pin_generate,
    pin_hash,
    pin_matches,
)

SAMPLE = 10**6
# Chi-square critical value for 31 degrees of freedom (32 symbols) at p = 1e-6 (the
# Wilson–Hilferty approximation gives 84.2): a fair generator fails one position of nine
# about once in a hundred thousand runs.
CHI_SQUARE_LIMIT = 84.2


@pytest.fixture(scope="module")
def million_codes() -> list[str]:
    return [code_generate() for _ in range(SAMPLE)]


def test_the_alphabet_has_no_letter_that_reads_two_ways():
    assert len(CODE_ALPHABET) == 32
    assert set(CODE_ALPHABET).isdisjoint("ILOU")
    assert len(set(CODE_ALPHABET)) == 32


def test_a_million_codes_use_exactly_the_alphabet_at_every_position(million_codes):
    assert all(len(code) == CODE_LENGTH for code in million_codes)
    for position in range(CODE_LENGTH):
        assert {code[position] for code in million_codes} == set(CODE_ALPHABET)


def test_a_million_codes_are_uniform_at_every_position(million_codes):
    expected = SAMPLE / len(CODE_ALPHABET)
    for position in range(CODE_LENGTH):
        counts = Counter(code[position] for code in million_codes)
        chi_square = sum((counts[c] - expected) ** 2 / expected for c in CODE_ALPHABET)
        assert chi_square < CHI_SQUARE_LIMIT, (position, chi_square)


def test_a_million_codes_collide_no_more_than_the_code_space_allows(million_codes):
    # 32**9 ≈ 3.5e13 codes: a million draws share a code with probability ~1.4 %, and
    # three or more coincidences essentially never happen with a fair generator.
    assert len(set(million_codes)) >= SAMPLE - 2


def test_codes_print_in_three_groups_of_three():
    assert code_format("K3Q2PBKF1") == "K3Q-2PB-KF1"
    assert code_format("k3q 2pb kf1") == "K3Q-2PB-KF1"


@pytest.mark.parametrize("typed", [
    "K3Q-2PB-KF1", "k3q-2pb-kf1", "K3Q 2PB KF1", " k3q2pbkf1 ", "K3Q–2PB—KF1",
    "K3Q-2PB-KFI", "K3Q-2PB-KFl", "K3Q-2PB-KFL", "k3q.2pb.kf1", "K3Q_2PB_KF1",
])
def test_typed_codes_normalise_to_one_canonical_form(typed):
    assert code_normalise(typed) == "K3Q2PBKF1"
    assert code_matches(typed, code_hash("K3Q2PBKF1"))


def test_the_letter_o_is_read_as_zero():
    assert code_normalise("o1o-OOO-0a0") == "0100000A0"


def test_malformed_codes_are_recognised_after_normalising():
    assert code_is_well_formed(code_normalise("K3Q-2PB-KFI"))
    assert not code_is_well_formed(code_normalise("K3Q-2PB-KF"))
    assert not code_is_well_formed(code_normalise("K3Q-2PB-KF1-X"))
    assert not code_is_well_formed(code_normalise("K3Q-2PB-KFU"))  # U is not in the alphabet


def test_a_code_hash_is_keyed_and_never_the_code(settings):
    digest = code_hash("K3Q2PBKF1")
    assert len(digest) == 64 and "K3Q2PBKF1" not in digest
    settings.ACCESS_CODE_KEY = "another key"
    assert code_hash("K3Q2PBKF1") != digest
    assert not code_matches("K3Q2PBKF1", digest)


def test_a_wrong_code_does_not_match():
    assert not code_matches("K3Q-2PB-KF2", code_hash("K3Q2PBKF1"))


def test_the_suffix_a_clerk_sees_is_the_last_three_symbols():
    assert code_suffix("k3q-2pb-kfi") == "KF1"


def test_pins_are_six_digits_hashed_apart_from_codes():
    pins = {pin_generate() for _ in range(2000)}
    assert all(len(pin) == 6 and pin.isdigit() for pin in pins)
    assert any(pin.startswith("0") for pin in pins)  # leading zeros are kept
    assert pin_matches("317 486", pin_hash("317486"))
    assert not pin_matches("317487", pin_hash("317486"))
    assert pin_hash("123456789") != code_hash("123456789")
