"""Files: uploads (multipart, streamed, and Gemini's resumable protocol), Anthropic's Files API, listing,
downloads and deletion."""

import json
import re
import time

from .base import ANTHROPIC, GEMINI, HTTPError, OPENAI, b64, bounded_int, clip
from .providers import first_of, check_key, invalid, new_id, rfc3339
from .request import MAX_FIELD, MAX_FORM_BYTES, MAX_PARTS
from .routing import anthropic_page, int_arg, page_body


def file_record(name, mime, nbytes, digest, **extra):
    record = {"id": new_id("", 8), "filename": name, "mime": mime, "bytes": nbytes, "created": time.time(),
              "sha256": digest}
    record.update(extra)
    return record


def openai_file(r):
    """The File object; ``expires_at`` only when the file expires (OpenAI's document types it an integer, not
    nullable), and never the deprecated ``status_details``."""
    out = {"id": "file-" + r["id"], "object": "file", "bytes": r["bytes"], "created_at": int(r["created"]),
           "filename": r["filename"], "purpose": r.get("purpose", "user_data"), "status": "processed"}
    if r.get("expires_at") is not None:
        out["expires_at"] = int(r["expires_at"])
    return out


def gemini_file(r, origin):
    created = rfc3339(r["created"])
    out = {"name": "files/" + r["id"], "displayName": r["filename"], "mimeType": r["mime"],
           "sizeBytes": str(r["bytes"]), "createTime": created, "updateTime": created,
           "expirationTime": rfc3339(r["created"] + 48 * 3600), "sha256Hash": b64(r["sha256"]),
           "uri": "%s/v1beta/files/%s" % (origin, r["id"]), "state": "ACTIVE", "source": "UPLOADED"}
    if r.get("generated"):  # made by dpmock (a batch's responses): downloadable
        out.update(source="GENERATED", downloadUri="%s/download/v1beta/files/%s:download?alt=media" % (origin, r["id"]))
    return out


def anthropic_file(r):
    """Anthropic's FileMetadata (Files API, beta)."""
    return {"id": ANTHROPIC_FILE + r["id"], "type": "file", "filename": r["filename"], "mime_type": r["mime"],
            "size_bytes": r["bytes"], "created_at": rfc3339(r["created"]), "downloadable": True}


ANTHROPIC_FILE = "file_011"  #: Anthropic's file ids: this, then dpmock's own id


def _file_id(req):
    file_id = req.params["file_id"]
    return file_key(req.provider, file_id)


def file_key(provider, file_id):
    """The store's id of a provider's file id (OpenAI's file-..., Anthropic's file_011..., Gemini's files/...)."""
    prefix = {OPENAI: "file-", ANTHROPIC: ANTHROPIC_FILE}.get(provider, "files/")
    return file_id[len(prefix):] if file_id.startswith(prefix) else file_id


def _missing_file(req):
    if req.provider == GEMINI:
        return HTTPError(404, "File files/%s does not exist." % _file_id(req), etype="NOT_FOUND")
    if req.provider == ANTHROPIC:
        return HTTPError(404, "File not found: %s" % clip(req.params["file_id"]), etype="not_found_error")
    return HTTPError(404, "No such File object: %s" % req.params["file_id"], param="id")


def handle_files_list(w, req):
    check_key(req)
    records = w.server.files.list(req.provider)
    if req.provider == GEMINI:
        size = int_arg(req, "pageSize", 10, 1, 100)
        token = req.arg("pageToken") or "0"
        start = bounded_int(token, 0, 2 ** 62)  # past the end (files deleted since): an empty page
        if start is None:
            raise invalid("Invalid page token %r." % clip(token), "pageToken")
        answer = {"files": [gemini_file(r, req.origin()) for r in records[start:start + size]]}
        if start + size < len(records):
            answer["nextPageToken"] = str(start + size)
        w.send_json(200, answer)
        return
    if req.provider == ANTHROPIC:  # newest first, Anthropic's paging
        page, more = anthropic_page(req, list(reversed(records)), lambda r: ANTHROPIC_FILE + r["id"], "file")
        w.send_json(200, dict(page_body([anthropic_file(r) for r in page]), has_more=more))
        return
    data = [openai_file(r) for r in reversed(records)]
    w.send_json(200, {"object": "list", "data": data, "has_more": False,
                      "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


def handle_file_get(w, req):
    check_key(req)
    record = w.server.files.get(req.provider, _file_id(req))
    if record is None:
        raise _missing_file(req)
    w.send_json(200, gemini_file(record, req.origin()) if req.provider == GEMINI else
                anthropic_file(record) if req.provider == ANTHROPIC else openai_file(record))


def handle_file_delete(w, req):
    check_key(req)
    record = w.server.files.remove(req.provider, _file_id(req))
    if record is None:
        raise _missing_file(req)
    if req.provider == ANTHROPIC:
        w.send_json(200, {"id": ANTHROPIC_FILE + record["id"], "type": "file_deleted"})
        return
    w.send_json(200, {} if req.provider == GEMINI else {"id": "file-" + record["id"], "object": "file",
                                                         "deleted": True})


def _hasher():
    import hashlib  # loads OpenSSL: kept off the start-up path
    return hashlib.sha256()


def count_body(req):
    """Consume the body, returning (byte count, sha256 digest); nothing is kept."""
    digest = _hasher()
    n = 0
    for piece in req.body_pieces():
        n += len(piece)
        digest.update(piece)
    return n, digest.digest()


def small_body(req):
    """The whole body when it is small metadata; 413 past MAX_FIELD."""
    data = bytearray()
    for piece in req.body_pieces():
        data += piece
        if len(data) > MAX_FIELD:
            raise HTTPError(413, "metadata body over %d bytes" % MAX_FIELD, close=True)
    return bytes(data)


def handle_file_upload(w, req):
    """POST /files: multipart/form-data parsed as it streams in; OpenAI's (with a purpose; the file part is
    only counted, a batch file's kept) or Anthropic's Files API (its bytes kept, for downloads)."""
    check_key(req)
    boundary = multipart_boundary(req, "multipart/form-data")
    # A purpose sent before the file that keeps no bytes lets the file go by, only counted.
    fields, files = read_multipart(req, boundary, keep_files=KEPT_FILE_BYTES, keep_if=lambda fields: (
        req.provider == ANTHROPIC or fields.get("purpose", KEPT_PURPOSES[0]) in KEPT_PURPOSES))
    if req.provider == ANTHROPIC:
        if not files:
            raise invalid("file: Field required")
        name, mime, nbytes, digest, content, _ = files[0]
        if content is False:
            raise HTTPError(413, "file: dpmock keeps Anthropic's uploads up to %d bytes, not %d" % (
                KEPT_FILE_BYTES, nbytes), etype="request_too_large")
        record = file_record(name, mime, nbytes, digest, content=content)
        w.send_json(200, anthropic_file(w.server.files.add(ANTHROPIC, record)))
        return
    if not files:
        raise invalid("Missing required parameter: 'file'.", "file", "missing_required_parameter")
    purpose = fields.get("purpose")
    if not purpose:
        raise invalid("Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
    name, mime, nbytes, digest, content, _ = files[0]
    record = file_record(name, mime, nbytes, digest, purpose=purpose)
    if purpose in KEPT_PURPOSES:
        if content is False or content is None:  # too large (or a form whose purpose came after a big file)
            raise HTTPError(413, "a file of purpose %s is kept by dpmock up to %d bytes, not %d" % (
                purpose, KEPT_FILE_BYTES, nbytes), "file_too_large", param="file")
        record["content"] = content
    w.send_json(200, openai_file(w.server.files.add(OPENAI, record)))


KEPT_FILE_BYTES = 32 * 1024 * 1024  #: an uploaded file's bytes kept (for a batch's input) up to this size
KEPT_PURPOSES = ("batch",)  #: the purposes whose files' bytes are kept (others are only counted)


def handle_file_content(w, req):
    """GET /files/{id}/content: a kept file's bytes (a batch's input, output and error files; Anthropic's)."""
    check_key(req)
    record = w.server.files.get(req.provider, _file_id(req))
    if record is None:
        raise _missing_file(req)
    if record.get("content") is None and req.provider == ANTHROPIC:
        raise invalid("File %s is not downloadable" % clip(req.params["file_id"]))
    if record.get("content") is None:
        raise invalid("Not allowed to download files of purpose: %s. (dpmock keeps the bytes of files of purpose %s "
                      "and of batch output only.)" % (record.get("purpose"), ", ".join(KEPT_PURPOSES)))
    w.send_bytes(200, record["content"], record.get("mime") or "application/octet-stream")


def handle_gemini_upload_raw(w, req):
    """POST /files:upload?key=: the C library's raw upload (body = the file's bytes)."""
    check_key(req)
    nbytes, digest = count_body(req)
    if nbytes == 0:
        raise invalid("File is empty.")
    mime = (req.headers.get("content-type") or "application/octet-stream").split(";")[0].strip()
    record = w.server.files.add(GEMINI, file_record(req.arg("name") or "upload", mime, nbytes, digest))
    w.send_json(200, {"file": gemini_file(record, req.origin())})


def handle_gemini_upload(w, req):
    """POST /upload/v1beta/files: the resumable protocol (start, upload, finalize), media or multipart."""
    hdr = req.headers
    protocol = (hdr.get("x-goog-upload-protocol") or req.arg("uploadType") or "").lower()
    upload_id = req.arg("upload_id")
    if upload_id is not None:  # the upload URL: authorised by its session, the SDK sends no key there
        return resumable_chunk(w, req, upload_id)
    check_key(req)
    if protocol == "resumable":
        command = (hdr.get("x-goog-upload-command") or "").lower()
        if command != "start":
            raise invalid("X-Goog-Upload-Command must be 'start' to begin a resumable upload, not %r" % command)
        meta = _upload_meta(small_body(req))
        session = {"id": new_id("", 16), "received": 0, "hash": _hasher(),
                   "name": meta.get("name") or hdr.get("x-goog-upload-file-name") or "upload",
                   "mime": meta.get("mime") or hdr.get("x-goog-upload-header-content-type") or
                   "application/octet-stream"}
        if jsonl_mime(session["mime"], session["name"]):  # a batch's input: its bytes are kept (bounded)
            session["content"] = bytearray()
        w.server.files.start_upload(session)
        url = "%s/upload/v1beta/files?upload_id=%s&upload_protocol=resumable" % (req.origin(), session["id"])
        w.send_bytes(200, b"", "text/plain; charset=utf-8", [
            ("X-Goog-Upload-URL", url), ("X-Goog-Upload-Control-URL", url), ("X-Goog-Upload-Status", "active"),
            ("X-Goog-Upload-Chunk-Granularity", "8388608")])
    elif protocol == "multipart":
        boundary = multipart_boundary(req, "multipart/related")
        fields, files = read_multipart(req, boundary, keep_first=True, keep_files=KEPT_FILE_BYTES, keep_if=_keep_jsonl)
        if not files:
            raise invalid("multipart upload has no media part")
        meta = _upload_meta(fields.get(""))
        _, mime, nbytes, digest, content, _ = files[0]
        gemini_store(w, req, meta.get("name") or "upload", meta.get("mime") or mime, nbytes, digest,
                     content=content or None)
    elif protocol in ("media", "raw", ""):
        nbytes, digest = count_body(req)
        mime = (hdr.get("content-type") or "application/octet-stream").split(";")[0].strip()
        gemini_store(w, req, hdr.get("x-goog-upload-file-name") or "upload", mime, nbytes, digest)
    else:
        raise invalid("unsupported upload protocol %r; use resumable, multipart or media" % protocol)


def _upload_meta(raw):
    """Display name and MIME type from an upload's JSON metadata (either spelling)."""
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise invalid("upload metadata is not valid JSON: %s" % e)
    except RecursionError:
        raise invalid("upload metadata is nested too deeply")
    f = first_of(meta, "file") if isinstance(meta, dict) else None
    f = f if isinstance(f, dict) else {}
    name, mime = first_of(f, "displayName", "display_name"), first_of(f, "mimeType", "mime_type")
    for field, value in (("displayName", name), ("mimeType", mime)):
        if value is not None and not isinstance(value, str):
            raise invalid("upload metadata: file.%s must be a string" % field)
    return {"name": name, "mime": mime}


def _keep_jsonl(fields):
    """A multipart upload's media is kept when its metadata says JSONL (bad metadata: the 400 comes after)."""
    try:
        meta = _upload_meta(fields.get(""))
    except HTTPError:
        return False
    return jsonl_mime(meta.get("mime"), meta.get("name"))


def jsonl_mime(mime, name):
    """Whether a Gemini upload is JSONL (a batch's requests): its bytes are kept, as OpenAI's batch files'."""
    return "jsonl" in (mime or "").lower() or (name or "").lower().endswith(".jsonl")


def gemini_store(w, req, name, mime, nbytes, digest, headers=(), content=None):
    if nbytes == 0:
        raise invalid("File is empty.")
    extra = {"content": bytes(content)} if content is not None else {}
    record = w.server.files.add(GEMINI, file_record(name, mime, nbytes, digest, **extra))
    w.send_json(200, {"file": gemini_file(record, req.origin())}, headers)


def resumable_chunk(w, req, upload_id):
    session = w.server.files.upload(upload_id)
    if session is None:
        raise HTTPError(404, "upload session %r is unknown or finished" % upload_id, etype="NOT_FOUND")
    command = [c.strip() for c in (req.headers.get("x-goog-upload-command") or "").lower().split(",")]
    offset = req.headers.get("x-goog-upload-offset")
    if "upload" in command:
        if offset is None or bounded_int(offset, 0, 2 ** 62) != session["received"]:
            raise invalid("X-Goog-Upload-Offset %r does not match the %d bytes received"
                          % (clip(offset), session["received"]))
        for piece in req.body_pieces():
            session["received"] += len(piece)
            session["hash"].update(piece)
            kept = session.get("content")
            if kept is not None:
                if len(kept) + len(piece) > KEPT_FILE_BYTES or not w.server.files.hold(len(piece)):
                    w.server.files.hold(-len(kept))
                    session["content"] = None  # too large to keep (or too much kept by open uploads): counted
                else:
                    kept += piece
    elif "query" in command or "cancel" in command or "finalize" in command:
        small_body(req)
    else:
        raise invalid("X-Goog-Upload-Command must be upload, finalize, query or cancel")
    if "cancel" in command:
        w.server.files.end_upload(upload_id)
        w.send_bytes(200, b"", "text/plain; charset=utf-8", [("X-Goog-Upload-Status", "cancelled")])
    elif "finalize" in command:
        w.server.files.end_upload(upload_id)
        gemini_store(w, req, session["name"], session["mime"], session["received"], session["hash"].digest(),
                     [("X-Goog-Upload-Status", "final")], session.get("content"))
    else:
        w.send_bytes(200, b"", "text/plain; charset=utf-8", [
            ("X-Goog-Upload-Status", "active"), ("X-Goog-Upload-Size-Received", str(session["received"]))])

_PARAM_RE = r';\s*([\w-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))'


def header_params(value):
    """(main value lower-cased, {param: value}) of a header like Content-Type or Content-Disposition."""
    main = value.split(";", 1)[0].strip().lower()
    return main, {k.lower(): q or u for k, q, u in re.findall(_PARAM_RE, value)}


def multipart_boundary(req, kind):
    ctype = req.headers.get("content-type") or ""
    main, params = header_params(ctype)
    if main != kind or not params.get("boundary"):
        raise invalid("Content-Type must be %s with a boundary, not %r" % (kind, ctype[:80]))
    return params["boundary"].encode("latin-1")


def read_multipart(req, boundary, keep_first=False, keep_files=0, keep_if=None):
    """Parse a multipart body as it arrives: fields are kept (up to MAX_FIELD), files only counted.

    Returns ({field name: text}, [(filename, mime, byte count, sha256 digest, bytes or None, field name)]). With
    ``keep_first`` the first part is kept as field "" (Gemini's JSON metadata part); with ``keep_files``
    the first file's bytes are kept too, up to that many (a larger file's are not: False), unless
    ``keep_if(fields so far)`` says no when it starts (other files are only counted: None). At most
    MAX_PARTS parts and MAX_FORM_BYTES of field text are accepted (as Go's mime/multipart and
    Werkzeug bound forms): a form can't make dpmock hold more than that.
    """
    delim = b"\r\n--" + boundary
    held = 0
    buf = b"\r\n"  # so the first delimiter looks like every later one
    pieces = req.body_pieces()
    fields, files = {}, []

    def more():
        piece = next(pieces, None)
        if piece is None:
            raise invalid("multipart body ended before its closing boundary")
        return piece
    while True:  # preamble
        at = buf.find(delim)
        if at >= 0:
            buf = buf[at + len(delim):]
            break
        buf = buf[-len(delim):] + more()
    index = 0
    while True:
        while len(buf) < 2:
            buf += more()
        if buf[:2] == b"--":  # closing delimiter: drain the epilogue
            for _ in pieces:
                pass
            return fields, files
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_FIELD:
                raise invalid("multipart part headers over %d bytes" % MAX_FIELD)
            buf += more()
        if index >= MAX_PARTS:
            raise HTTPError(413, "multipart body has more than %d parts" % MAX_PARTS, "request_too_large", close=True)
        head, buf = buf.split(b"\r\n\r\n", 1)
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        _, disp = header_params(headers.get("content-disposition", ""))
        is_file = "filename" in disp or (index > 0 and keep_first)
        keep = keep_files if is_file and not files and (keep_if is None or keep_if(fields)) else 0
        kept = bytearray()
        size = 0
        digest = _hasher() if is_file else None
        while True:
            at = buf.find(delim)
            if at >= 0:
                body, buf = buf[:at], buf[at + len(delim):]
            else:
                cut = max(0, len(buf) - len(delim))
                body, buf = buf[:cut], buf[cut:]
            size += len(body)
            if is_file:
                digest.update(body)
                if keep and size <= keep:
                    kept += body
                elif kept:
                    kept = bytearray()  # too large to keep: only counted, as other files are
            elif len(kept) + len(body) > MAX_FIELD:
                raise invalid("multipart field over %d bytes" % MAX_FIELD)
            elif held + len(kept) + len(body) > MAX_FORM_BYTES:
                raise HTTPError(413, "multipart fields over %d bytes in all" % MAX_FORM_BYTES, "request_too_large",
                                close=True)
            else:
                kept += body
            if at >= 0:
                break
            buf += more()
        if is_file:
            files.append((disp.get("filename") or "upload", headers.get("content-type", "application/octet-stream"),
                          size, digest.digest(), (bytes(kept) if size <= keep else False) if keep else None,
                          disp.get("name", "")))
        else:
            held += len(kept)
            name = "" if keep_first and index == 0 else disp.get("name", "")
            value = kept.decode("utf-8", "replace")
            if name.endswith("[]"):  # an array field (timestamp_granularities[]): every value, in order
                fields.setdefault(name, []).append(value)
            else:
                fields[name] = value
        index += 1
