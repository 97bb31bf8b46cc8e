"""The wire encoding of a message's blocks (messaging.md §3.1) on the fast path."""
from __future__ import annotations


def test_fast_quote_is_urllib_quote_with_slash_safe():
    import random
    import urllib.parse

    from agentcp.msg.session_manager import quote_slash_safe

    rng = random.Random(8)
    alphabet = [chr(c) for c in range(0, 0x250)] + ["😀", "\u4e2d", "\U0010ffff", "%", "/", " ", "+", "~"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert quote_slash_safe(text) == urllib.parse.quote(text, safe="/")
    assert quote_slash_safe('[{"content": "a b/c"}]') == "%5B%7B%22content%22%3A%20%22a%20b/c%22%7D%5D"
