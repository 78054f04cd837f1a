"""Embeddings: deterministic unit vectors for text, as floats or base64."""

import array
import math
import re
import sys

from .base import count_arg, b64


EMBED_MAX_DIMS = 16384
_EMBED_SLOTS = 4        # signed positions per word
_EMBED_TEXT_TERM = 0.1  # norm of the per-text term relative to the word part
_WORD_RX = []


def _words(text):
    if not _WORD_RX:
        _WORD_RX.append(re.compile(r"\w+"))
    return _WORD_RX[0].findall(text.lower())


def _text_term(data, dims):
    """`dims` deterministic pseudo-random values in [-127.5, 127.5] from BLAKE2b of `data`."""
    import hashlib  # loads OpenSSL: first embedding only
    key = hashlib.blake2b(data, digest_size=32, person=b"dpmock-text").digest()
    blocks = [hashlib.blake2b(i.to_bytes(4, "little"), digest_size=64, key=key).digest()
              for i in range((dims + 63) // 64)]
    return array.array("b", b"".join(blocks)[:dims])


def embedding(text, dims=1536):
    """A deterministic unit vector of `dims` floats whose cosines follow shared words (module doc)."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    dims = count_arg(dims, 1536, False) if not isinstance(dims, bool) else 1536
    dims = min(max(dims, 1), EMBED_MAX_DIMS)
    import hashlib  # loads OpenSSL: first embedding only
    counts = {}
    for word in _words(text):
        counts[word] = counts.get(word, 0) + 1
    sparse = {}
    for word, n in counts.items():
        digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=16,
                                 person=b"dpmock-word").digest()
        weight = math.sqrt(n)
        for j in range(_EMBED_SLOTS):
            x = int.from_bytes(digest[4 * j:4 * j + 4], "little")
            slot = (x >> 1) % dims
            sparse[slot] = sparse.get(slot, 0.0) + (weight if x & 1 else -weight)
    word_norm = math.sqrt(sum(v * v for v in sparse.values()))
    term = _text_term(text.encode("utf-8", "surrogatepass"), dims)
    term_norm = math.sqrt(sum((x + 0.5) * (x + 0.5) for x in term))
    scale = (_EMBED_TEXT_TERM * word_norm if word_norm > 0 else 1.0) / term_norm
    cross = sum(v * (term[i] + 0.5) * scale for i, v in sparse.items())
    total = math.sqrt(word_norm * word_norm + (scale * term_norm) ** 2 + 2 * cross)
    if not total > 0:
        return [1.0] + [0.0] * (dims - 1)
    c = scale / total
    vec = [(x + 0.5) * c for x in term]
    for i, v in sparse.items():
        vec[i] += v / total
    return vec


def embedding_dims(model):
    """The default vector size of an embedding model name (1536 when unknown)."""
    name = str(model or "").lower().rsplit("/", 1)[-1]
    if name.startswith(("text-embedding-3-large", "gemini-embedding")):
        return 3072
    if name.startswith(("text-embedding-004", "text-embedding-005", "text-multilingual-embedding", "embedding-001")):
        return 768
    return 1536


def embedding_b64(vec):
    """OpenAI's base64 embedding: the floats as little-endian float32, base64-encoded."""
    data = array.array("f", [float(x) for x in vec])
    if sys.byteorder != "little":
        data.byteswap()
    return b64(data.tobytes())


def cosine(a, b):
    """Cosine similarity of two equal-length vectors (0.0 when either is zero)."""
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
