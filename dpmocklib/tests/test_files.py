"""Anthropic's Files API (beta): upload, list, metadata, download, delete, and files named in messages; the
official SDK's client.beta.files where it is installed."""

import importlib
import io
import json
import unittest

from .support import AN, OA, Server, _have, anthropic_messages

BETA = dict(AN, **{"anthropic-beta": "files-api-2025-04-14"})


def multipart(name, data, mime="text/plain", fields=()):
    body = b"".join(b'--B\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (k.encode(), v.encode())
                    for k, v in fields)
    body += (b'--B\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\nContent-Type: %s\r\n\r\n'
             % (name.encode(), mime.encode())) + data + b"\r\n--B--\r\n"
    return body, {"Content-Type": "multipart/form-data; boundary=B"}


class AnthropicFilesTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.srv = Server("-q")

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def upload(self, name, data, headers=BETA, mime="text/plain"):
        body, extra = multipart(name, data, mime)
        st, _, r = self.srv.request("POST", "/v1/files", body, dict(headers, **extra))
        return st, json.loads(r)

    def call(self, method, path, headers=BETA, body=None):
        st, hdrs, data = self.srv.request(method, path, json.dumps(body).encode() if body else None, headers)
        return st, hdrs, data

    def test_upload_list_metadata_download_delete(self):
        st, meta = self.upload("notes.txt", b"hello \xc3\xbc files")
        self.assertEqual(st, 200, meta)
        self.assertEqual((meta["type"], meta["filename"], meta["mime_type"], meta["size_bytes"]),
                         ("file", "notes.txt", "text/plain", 14))
        self.assertTrue(meta["id"].startswith("file_011") and meta["created_at"].endswith("Z"))
        st, meta2 = self.upload("data.bin", bytes(range(256)), mime="application/octet-stream")
        st, _, data = self.call("GET", "/v1/files?limit=1")
        page = json.loads(data)
        self.assertEqual(([f["id"] for f in page["data"]], page["has_more"]), ([meta2["id"]], True))
        st, _, data = self.call("GET", "/v1/files?limit=5&after_id=" + meta2["id"])
        self.assertIn(meta["id"], [f["id"] for f in json.loads(data)["data"]])
        st, _, data = self.call("GET", "/v1/files/" + meta["id"])
        self.assertEqual(json.loads(data), meta)
        st, hdrs, data = self.call("GET", "/v1/files/%s/content" % meta2["id"])
        self.assertEqual((st, data), (200, bytes(range(256))))
        self.assertEqual(hdrs["content-type"], "application/octet-stream")
        st, _, data = self.call("DELETE", "/v1/files/" + meta["id"])
        self.assertEqual(json.loads(data), {"id": meta["id"], "type": "file_deleted"})
        for method, path in (("GET", "/v1/files/" + meta["id"]), ("GET", "/v1/files/%s/content" % meta["id"]),
                             ("DELETE", "/v1/files/" + meta["id"])):
            st, _, data = self.call(method, path)
            self.assertEqual((st, json.loads(data)["error"]["type"]), (404, "not_found_error"), path)

    def test_anthropic_and_openai_uploads_are_told_apart(self):
        st, r = self.upload("x.txt", b"x")  # no purpose: Anthropic's API sends none
        self.assertEqual(st, 200, r)
        body, extra = multipart("x.jsonl", b"{}", fields=[("purpose", "batch")])
        st, _, data = self.srv.request("POST", "/v1/files", body, dict(OA, **extra))
        self.assertEqual((st, json.loads(data)["object"]), (200, "file"))
        body, extra = multipart("x.txt", b"x")
        st, _, data = self.srv.request("POST", "/v1/files", body, dict(OA, **extra))
        self.assertEqual((st, json.loads(data)["error"]["param"]), (400, "purpose"))  # OpenAI's needs one
        st, _, data = self.call("GET", "/v1/files/" + r["id"], headers=OA)  # each provider's files are its own
        self.assertEqual(st, 404)

    def test_a_message_may_name_an_uploaded_file(self):
        st, meta = self.upload("doc.pdf", b"%PDF-1.4 not really", mime="application/pdf")
        body = anthropic_messages("summarise it")
        body["messages"][0]["content"] = [{"type": "document", "source": {"type": "file", "file_id": meta["id"]}},
                                          {"type": "text", "text": "summarise it"}]
        st, _, data = self.call("POST", "/v1/messages", body=body)
        answer = json.loads(data)
        self.assertEqual((st, answer["content"][0]["text"]), (200, "dpmock reply to: summarise it"))
        self.assertGreater(answer["usage"]["input_tokens"], 80)  # the document counts
        body["messages"][0]["content"][0]["source"]["file_id"] = "file_011nope"
        st, _, data = self.call("POST", "/v1/messages", body=body)
        self.assertEqual((st, json.loads(data)["error"]["type"]), (404, "not_found_error"))
        body["messages"][0]["content"][0]["source"]["file_id"] = 5
        st, _, data = self.call("POST", "/v1/messages", body=body)
        self.assertEqual((st, json.loads(data)["error"]["type"]), (400, "invalid_request_error"))


@unittest.skipUnless(_have("anthropic"), "the anthropic package is not installed (optional)")
class AnthropicFilesSdkTest(unittest.TestCase):
    """anthropic's client.beta.files: upload, list, retrieve_metadata, download, delete, and a message naming it."""

    def setUp(self):
        anthropic = importlib.import_module("anthropic")
        self.srv = Server("-q")
        self.addCleanup(self.srv.stop)
        self.client = anthropic.Anthropic(base_url=self.srv.url, api_key="sk-ant-test", max_retries=0)
        self.addCleanup(self.client.close)

    def test_files_end_to_end(self):
        files = self.client.beta.files
        meta = files.upload(file=("notes.txt", io.BytesIO(b"some notes"), "text/plain"))
        self.assertEqual((meta.filename, meta.size_bytes), ("notes.txt", 10))
        self.assertEqual([f.id for f in files.list()], [meta.id])
        self.assertEqual(files.retrieve_metadata(meta.id).mime_type, "text/plain")
        self.assertEqual(files.download(meta.id).read(), b"some notes")
        r = self.client.beta.messages.create(
            model="claude-dpmock-test", max_tokens=100, betas=["files-api-2025-04-14"],
            messages=[{"role": "user", "content": [{"type": "document", "source": {"type": "file", "file_id": meta.id}},
                                                   {"type": "text", "text": "read it"}]}])
        self.assertEqual(r.content[0].text, "dpmock reply to: read it")
        self.assertEqual(files.delete(meta.id).type, "file_deleted")
        self.assertEqual(list(files.list()), [])


if __name__ == "__main__":
    unittest.main()
