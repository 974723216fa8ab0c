"""Access helpers: reading a bearer token file safely.

A token file holds one line, the token. An empty or whitespace-only file is
refused (``ClusterConfigError``) rather than silently serving without
authentication; so is a token with whitespace or control characters inside
(it could not travel in an ``authorization`` header). Token values are never
logged or echoed back in messages, only the path and the length.
"""

from __future__ import annotations

from pathlib import Path

from sterling.cluster.errors import ClusterConfigError

__all__ = ["read_token_file", "MIN_TOKEN_CHARS"]

MIN_TOKEN_CHARS = 16  # a shorter bearer token is guessable; `openssl rand -hex 32` gives 64


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace and the final newline stripped)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ClusterConfigError(f"token file {p} does not exist; create it with `openssl rand -hex 32 > {p}`") from e
    except IsADirectoryError as e:
        raise ClusterConfigError(f"token file {p} is a directory; give the file that holds the token") from e
    except UnicodeDecodeError as e:
        raise ClusterConfigError(f"token file {p} is not UTF-8 text; write the token as one line of text") from e
    except OSError as e:
        raise ClusterConfigError(f"token file {p} cannot be read ({e.strerror})") from e
    token = text.strip()
    if not token:
        raise ClusterConfigError(
            f"token file {p} is empty or only whitespace; refusing to serve without authentication. "
            f"Write a token into it (`openssl rand -hex 32 > {p}`) or drop --token-file"
        )
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ClusterConfigError(
            f"token file {p} holds more than one word or control characters; put exactly one token "
            "(printable, no spaces) on one line"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise ClusterConfigError(
            f"the token in {p} has {len(token)} characters, fewer than {MIN_TOKEN_CHARS}; use a random one, "
            "e.g. `openssl rand -hex 32`"
        )
    return token
