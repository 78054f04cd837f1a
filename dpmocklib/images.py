"""Images: the PNGs that image answers point at."""

import os
import re

from .base import HTTPError


def image_name(prompt):
    """An image id whose colour comes from the prompt, so the PNG can be made again from the name."""
    import zlib
    rgb = zlib.crc32(prompt.encode("utf-8")) & 0xFFFFFF
    return "img-%06x-%s.png" % (rgb, os.urandom(6).hex())


def png_for(name, size=8):
    """A real size x size PNG in one colour (taken from an image_name)."""
    import struct
    import zlib
    m = re.match(r"^img-([0-9a-f]{6})-[0-9a-f]+\.png$", name)
    if not m:
        raise HTTPError(404, "no image %r" % name, "not_found")
    rgb = bytes.fromhex(m.group(1))
    raw = b"".join(b"\0" + rgb * size for _ in range(size))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def handle_image_png(w, req):
    w.send_bytes(200, png_for(req.params["image"]), "image/png")
