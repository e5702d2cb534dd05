"""Security codes and PINs: how they are drawn, written, typed back and stored.

A share's security code is 9 characters from a 32-symbol alphabet in the style of
Douglas Crockford's base 32: the digits and the capitals without I, L, O and U, so that
nothing on a printed or faxed page can be read two ways. Typed input is forgiving: case,
spaces and hyphens do not matter, O is read as 0, and I or L as 1 (the letters a person
most often puts in their place).

Neither a code nor a PIN is ever stored: only an HMAC-SHA256 of it keyed with
``settings.ACCESS_CODE_KEY``, which lives outside the database. Without the key, a copy
of the database does not let anyone test guesses offline. Comparisons are constant-time.
"""

import hashlib
import hmac
import secrets

from django.conf import settings

CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 9
CODE_GROUP = 3
# 32 = 2**5 symbols: every 5 random bits pick one symbol with equal chance, no modulo bias.
_BITS_PER_SYMBOL = 5
assert len(CODE_ALPHABET) == 2**_BITS_PER_SYMBOL

# What a person may type in place of a symbol of the alphabet.
_TYPED_AS = {"O": "0", "I": "1", "L": "1"}
# Separators people put in codes (ASCII and typographic hyphens and dashes, dots, spaces).
_SEPARATORS = frozenset(" \t\r\n-_.\u2010\u2011\u2012\u2013\u2014\u2212\u00a0")

PIN_LENGTH = 6


def code_generate() -> str:
    """A fresh security code, 9 symbols without separators, from ``secrets``."""
    bits = secrets.randbits(_BITS_PER_SYMBOL * CODE_LENGTH)
    mask = len(CODE_ALPHABET) - 1
    return "".join(
        CODE_ALPHABET[(bits >> (_BITS_PER_SYMBOL * i)) & mask] for i in range(CODE_LENGTH)
    )


def code_format(code: str) -> str:
    """The printed form, in groups of three: ``K3Q-2PB-KF1``."""
    code = code_normalise(code)
    return "-".join(code[i:i + CODE_GROUP] for i in range(0, len(code), CODE_GROUP))


def code_normalise(text: str) -> str:
    """The canonical form of what someone typed: upper case, separators dropped, O read
    as 0 and I or L as 1. The result may still be malformed; see ``code_is_well_formed``."""
    canonical = []
    for char in text.upper():
        if char in _SEPARATORS:
            continue
        canonical.append(_TYPED_AS.get(char, char))
    return "".join(canonical)


def code_is_well_formed(code: str) -> bool:
    """True for a normalised code of the right length in the alphabet."""
    return len(code) == CODE_LENGTH and all(c in CODE_ALPHABET for c in code)


def _keyed_hash(purpose: bytes, value: str) -> str:
    key = settings.ACCESS_CODE_KEY.encode()
    return hmac.new(key, purpose + b"\0" + value.encode(), hashlib.sha256).hexdigest()


def code_hash(code: str) -> str:
    """The keyed hash under which a code is stored (64 hex digits). Typed forms of the
    same code hash alike."""
    return _keyed_hash(b"share-code", code_normalise(code))


def code_matches(text: str, stored_hash: str) -> bool:
    """Whether typed ``text`` is the code stored as ``stored_hash`` (constant-time)."""
    return hmac.compare_digest(code_hash(text), stored_hash)


def code_suffix(code: str, length: int = 3) -> str:
    """The last symbols of a code: what a clerk may see and search by. The rest of the
    code (6 symbols, about 10⁹ values) still has to be guessed, online and throttled,
    together with the date of birth."""
    return code_normalise(code)[-length:]


def pin_generate() -> str:
    """A 6-digit PIN (for an upload request), leading zeros kept, from ``secrets``."""
    return f"{secrets.randbelow(10**PIN_LENGTH):0{PIN_LENGTH}d}"


def pin_normalise(text: str) -> str:
    return "".join(c for c in text if c not in _SEPARATORS)


def pin_hash(pin: str) -> str:
    return _keyed_hash(b"upload-pin", pin_normalise(pin))


def pin_matches(text: str, stored_hash: str) -> bool:
    return hmac.compare_digest(pin_hash(text), stored_hash)


# A link token (an upload link, a signing link) carries 24 random bytes from ``secrets``:
# 192 bits, written as 32 URL-safe characters.
LINK_TOKEN_BYTES = 24


def link_token_generate() -> str:
    return secrets.token_urlsafe(LINK_TOKEN_BYTES)


def link_token_hash(token: str, *, purpose: str) -> str:
    """The keyed hash under which a link token is stored. ``purpose`` keeps the tokens
    of different links apart: an upload token never opens a signing page."""
    return _keyed_hash(f"link:{purpose}".encode(), token.strip())
