"""Audio: speech in every format the standard library can write (checked by decoding it), transcriptions and
translations in every response_format, streamed too; the official SDK where it is installed."""

import base64
import importlib
import io
import json
import struct
import unittest
import warnings
import wave

from .support import OA, Server, _have, sse_events


def speech(text="Hello there from the speech route", **extra):
    return dict({"model": "gpt-4o-mini-tts", "input": text, "voice": "alloy"}, **extra)


def form(fields, filename="speech.wav", data=b""):
    body = b"".join(b'--B\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (k.encode(), v.encode())
                    for k, v in fields)
    body += (b'--B\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\nContent-Type: audio/wav\r\n\r\n'
             % filename.encode()) + data + b"\r\n--B--\r\n"
    return body, dict(OA, **{"Content-Type": "multipart/form-data; boundary=B"})


def crc(data, poly, width):
    """A CRC of FLAC's kind (MSB first, init 0), bit by bit: independent of the server's tables."""
    top, mask, c = 1 << (width - 1), (1 << width) - 1, 0
    for byte in data:
        c ^= byte << (width - 8)
        for _ in range(8):
            c = ((c << 1) ^ poly) & mask if c & top else (c << 1) & mask
    return c


def decode_flac(data):
    """(sample rate, total samples, comments, samples as little-endian PCM16) of a FLAC stream of verbatim
    mono 16-bit frames, checking each header's CRC-8 and each frame's CRC-16."""
    assert data[:4] == b"fLaC"
    at, comments = 4, []
    while True:
        last, kind, size = data[at] >> 7, data[at] & 0x7F, int.from_bytes(data[at + 1:at + 4], "big")
        block = data[at + 4:at + 4 + size]
        if kind == 0:
            packed = int.from_bytes(block[10:18], "big")
            rate, channels, bits, total = packed >> 44, (packed >> 41 & 7) + 1, (packed >> 36 & 31) + 1, packed & (
                (1 << 36) - 1)
            assert (channels, bits) == (1, 16)
        elif kind == 4:
            n = struct.unpack("<I", block[:4])[0]
            count = struct.unpack("<I", block[4 + n:8 + n])[0]
            p = 8 + n
            for _ in range(count):
                m = struct.unpack("<I", block[p:p + 4])[0]
                comments.append(block[p + 4:p + 4 + m].decode())
                p += 4 + m
        at += 4 + size
        if last:
            break
    pcm = bytearray()
    while at < len(data):
        assert data[at:at + 2] == b"\xff\xf8"
        code = data[at + 2] >> 4
        p = at + 4
        first = data[p]
        p += 1 if first < 0x80 else 2 if first < 0xE0 else 3
        if code == 12:
            count = 4096
        else:
            assert code == 7
            count = struct.unpack(">H", data[p:p + 2])[0] + 1
            p += 2
        assert data[p] == crc(data[at:p], 0x07, 8), "header CRC-8"
        p += 1
        assert data[p] == 0x02  # a verbatim subframe
        samples = data[p + 1:p + 1 + 2 * count]
        end = p + 1 + 2 * count
        assert struct.unpack(">H", data[end:end + 2])[0] == crc(data[at:end], 0x8005, 16), "frame CRC-16"
        pcm += b"".join(samples[i + 1:i + 2] + samples[i:i + 1] for i in range(0, len(samples), 2))
        at = end + 2
    return rate, total, comments, bytes(pcm)


class SpeechTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.srv = Server("-q")

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def post(self, path, body, headers=OA):
        return self.srv.request("POST", path, json.dumps(body).encode() if isinstance(body, dict) else body,
                                dict(headers, **({"Content-Type": "application/json"} if isinstance(body, dict)
                                                 else {})))

    def test_every_format_decodes_to_the_same_tone(self):
        st, hdrs, data = self.post("/v1/audio/speech", speech(response_format="wav"))
        self.assertEqual((st, hdrs["content-type"]), (200, "audio/wav"))
        w = wave.open(io.BytesIO(data))
        self.assertEqual((w.getnchannels(), w.getframerate(), w.getsampwidth()), (1, 24000, 2))
        pcm = w.readframes(w.getnframes())
        self.assertAlmostEqual(w.getnframes() / 24000.0, 6 * 0.2, delta=0.05)  # six words
        self.assertEqual(self.post("/v1/audio/speech", speech(response_format="wav"))[2], data)  # deterministic
        self.assertNotEqual(self.post("/v1/audio/speech", speech(response_format="wav", voice="onyx"))[2], data)
        st, hdrs, raw = self.post("/v1/audio/speech", speech(response_format="pcm"))
        self.assertEqual((hdrs["content-type"], raw), ("audio/pcm", pcm))
        st, hdrs, flac = self.post("/v1/audio/speech", speech(response_format="flac"))
        rate, total, comments, samples = decode_flac(flac)
        self.assertEqual((hdrs["content-type"], rate, total, samples), ("audio/flac", 24000, len(pcm) // 2, pcm))
        self.assertEqual(comments, ["DESCRIPTION=Hello there from the speech route"])
        st, hdrs, mp3 = self.post("/v1/audio/speech", speech())  # mp3 by default
        self.assertEqual((hdrs["content-type"], mp3[:3]), ("audio/mpeg", b"ID3"))
        size = 10 + sum(b << s for b, s in zip(mp3[6:10], (21, 14, 7, 0)))
        frames = mp3[size:]
        self.assertEqual(len(frames) % 192, 0)
        self.assertTrue(all(frames[i:i + 4] == b"\xff\xf3\x84\xc0" for i in range(0, len(frames), 192)))
        self.assertAlmostEqual(len(frames) // 192 * 576 / 24000.0, len(pcm) / 48000.0, delta=0.03)
        st, hdrs, faster = self.post("/v1/audio/speech", speech(response_format="pcm", speed=2.0))
        self.assertAlmostEqual(len(faster) / len(pcm), 0.5, delta=0.05)

    def test_speech_streams_as_sse_deltas(self):
        st, hdrs, data = self.post("/v1/audio/speech", speech("a b c " * 40, stream_format="sse"))
        events = [json.loads(d) for _, d in sse_events(data)]
        self.assertEqual({e["type"] for e in events[:-1]}, {"speech.audio.delta"})
        self.assertEqual((events[-1]["type"], events[-1]["usage"]["input_tokens"]), ("speech.audio.done", 120))
        whole = self.post("/v1/audio/speech", speech("a b c " * 40))[2]
        self.assertEqual(b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), whole)
        raw = self.srv.raw(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
                           b"Bearer k\r\nX-DP-Scenario: STREAM_CUT; events=1\r\nContent-Length: %d\r\n\r\n%s" % (
                               len(json.dumps(speech("a b c " * 40, stream_format="sse"))),
                               json.dumps(speech("a b c " * 40, stream_format="sse")).encode()))
        self.assertEqual(raw.count(b"speech.audio.delta"), 1)  # the stream's faults apply

    def test_bad_speech_requests_name_the_field(self):
        for body, param in ((speech(voice="nobody"), "voice"), (speech(response_format="ogg"), "response_format"),
                            (speech(response_format="opus"), "response_format"), (speech("x" * 4097), "input"),
                            (speech(speed=9), "speed"), ({"model": "tts-1", "voice": "alloy"}, "input"),
                            (speech(model="tts-1", stream_format="sse"), "stream_format"),
                            (speech(stream_format="wav"), "stream_format")):
            st, _, data = self.post("/v1/audio/speech", body)
            self.assertEqual((st, json.loads(data)["error"]["param"]), (400, param), body)
        st, _, data = self.post("/v1/audio/speech", speech(voice={"id": "voice_custom1"}, response_format="pcm"))
        self.assertEqual(st, 200)
        for body in (speech(response_format=["mp3"]), speech(stream_format=["sse"])):
            self.assertEqual(self.post("/v1/audio/speech", body)[0], 400)

    def test_transcriptions_give_dpmocks_own_speech_back_in_every_format(self):
        audio = self.post("/v1/audio/speech", speech(response_format="wav"))[2]
        said = "Hello there from the speech route"
        for model, fmt, check in (
                ("whisper-1", "json", lambda r: (json.loads(r)["text"], json.loads(r)["usage"]["type"]) == (
                    said, "duration")),
                ("gpt-4o-transcribe", "json", lambda r: json.loads(r)["usage"]["type"] == "tokens"),
                ("whisper-1", "text", lambda r: r == (said + "\n").encode()),
                ("whisper-1", "srt", lambda r: r.decode().startswith("1\n00:00:00,000 --> 00:00:01,")),
                ("whisper-1", "vtt", lambda r: r.decode().startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.")),
                ("gpt-4o-mini-transcribe", "text", lambda r: r.strip() == said.encode())):
            body, headers = form([("model", model), ("response_format", fmt)], data=audio)
            st, _, data = self.post("/v1/audio/transcriptions", body, headers)
            self.assertEqual(st, 200, data)
            self.assertTrue(check(data), (model, fmt, data))
        body, headers = form([("model", "whisper-1"), ("response_format", "verbose_json"),
                              ("timestamp_granularities[]", "word"), ("timestamp_granularities[]", "segment")],
                             data=audio)
        r = json.loads(self.post("/v1/audio/transcriptions", body, headers)[2])
        self.assertEqual((r["task"], r["language"], r["text"], len(r["words"]), len(r["segments"])),
                         ("transcribe", "english", said, 6, 1))
        self.assertAlmostEqual(r["duration"], 1.2, delta=0.05)
        self.assertLessEqual(r["words"][-1]["end"], r["duration"])
        body, headers = form([("model", "whisper-1")], filename="memo.m4a", data=b"\0" * 32000)
        self.assertEqual(json.loads(self.post("/v1/audio/translations", body, headers)[2])["text"],
                         "dpmock translation of memo.m4a (2.0 seconds of audio).")
        body, headers = form([("model", "gpt-4o-transcribe"), ("stream", "true")], data=audio)
        st, hdrs, data = self.post("/v1/audio/transcriptions", body, headers)
        events = [json.loads(d) for _, d in sse_events(data)]
        self.assertEqual("".join(e["delta"] for e in events[:-1]), said)
        self.assertEqual((events[-1]["type"], events[-1]["text"]), ("transcript.text.done", said))

    def test_bad_transcription_requests(self):
        for fields, param in (([("response_format", "json")], "model"),
                              ([("model", "whisper-1"), ("response_format", "docx")], "response_format"),
                              ([("model", "gpt-4o-transcribe"), ("response_format", "srt")], "response_format"),
                              ([("model", "whisper-1"), ("stream", "true")], "stream")):
            body, headers = form(fields, data=b"RIFF")
            st, _, data = self.post("/v1/audio/transcriptions", body, headers)
            self.assertEqual((st, json.loads(data)["error"]["param"]), (400, param), fields)
        body, headers = form([("model", "gpt-4o-transcribe")], data=b"x")
        self.assertEqual(json.loads(self.post("/v1/audio/translations", body, headers)[2])["error"]["param"], "model")
        icmt = b"a " * 100000
        lying = (b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"LIST" + struct.pack("<I", len(icmt) + 8) + b"INFO" +
                 b"ICMT" + struct.pack("<I", len(icmt)) + icmt + b"data" + struct.pack("<I", 2 ** 31))
        for data in (b"ID3\x04\0\0\0\0\0\x0aTIT2", b"fLaC" + bytes(40), lying, b"RIFF\0\0\0\0WAVE" + b"JUNK\0\0\0\0" * 5000):
            body, headers = form([("model", "whisper-1"), ("response_format", "verbose_json"),
                                  ("timestamp_granularities[]", "word")], data=data)
            st, _, r = self.post("/v1/audio/transcriptions", body, headers)
            self.assertEqual(st, 200, r[:200])
            r = json.loads(r)
            self.assertLessEqual(len(r["text"]), 4096)
            self.assertLessEqual(r["duration"], len(data) / 100.0)  # a header that lies is not believed


@unittest.skipUnless(_have("openai"), "the openai package is not installed (optional)")
class AudioSdkTest(unittest.TestCase):
    """openai's client.audio.speech, transcriptions and translations."""

    def setUp(self):
        openai = importlib.import_module("openai")
        self.srv = Server("-q")
        self.addCleanup(self.srv.stop)
        self.client = openai.OpenAI(base_url=self.srv.url + "/v1", api_key="sk-test", max_retries=0)
        self.addCleanup(self.client.close)

    def test_speech_then_transcription_round_trip(self):
        c = self.client
        audio = c.audio.speech.create(model="gpt-4o-mini-tts", voice="coral", input="Testing one two three",
                                      response_format="wav").read()
        self.assertEqual(wave.open(io.BytesIO(audio)).getframerate(), 24000)
        t = c.audio.transcriptions.create(model="whisper-1", file=("s.wav", io.BytesIO(audio)),
                                          response_format="verbose_json", timestamp_granularities=["word"])
        self.assertEqual((t.text, [w.word for w in t.words]), ("Testing one two three",
                                                                ["Testing", "one", "two", "three"]))
        events = list(c.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("s.wav", io.BytesIO(audio)),
                                                    stream=True))
        self.assertEqual(events[-1].text, "Testing one two three")
        with warnings.catch_warnings():  # the SDK marks translations deprecated; they are still served
            warnings.simplefilter("ignore", DeprecationWarning)
            text = c.audio.translations.create(model="whisper-1", file=("s.wav", io.BytesIO(audio))).text
        self.assertEqual(text, "Testing one two three")
        with c.audio.speech.with_streaming_response.create(model="gpt-4o-mini-tts", voice="alloy", input="hi",
                                                           response_format="pcm") as resp:
            self.assertEqual(len(resp.read()) % 2, 0)


if __name__ == "__main__":
    unittest.main()
