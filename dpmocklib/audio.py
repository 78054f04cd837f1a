"""Audio: OpenAI's speech (deterministic tones as WAV, PCM and FLAC, silent MP3 frames; or SSE deltas) and
transcriptions and translations (multipart; every response_format; streamed), all made with the standard
library. Speech dpmock made carries its text (a WAV INFO comment, a FLAC Vorbis comment, an MP3 ID3 title),
so transcribing it gives the text back."""

import array
import math
import re
import struct
import sys

from .base import HTTPError, b64, clip
from .files import multipart_boundary, read_multipart
from .providers import check_key, check_model, count_tokens, invalid

RATE = 24000  #: OpenAI's PCM: 24 kHz, 16-bit signed little-endian, mono (and every format here)
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse", "marin",
          "cedar")
TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav",
         "pcm": "audio/pcm"}
MADE = ("mp3", "wav", "pcm", "flac")  #: the formats the standard library can write (opus and aac need codecs)
WORD_S, GAP_S, MAX_S = 0.16, 0.04, 15.0  #: a word's tone, the silence after it, the longest answer (seconds)
MAX_AUDIO = 25 * 1024 * 1024  #: the largest file transcriptions take (the real limit)
SSE_MODELS = ("gpt-4o-mini-tts",)  #: speech models that can stream_format "sse"


# ----------------------------------------------------------------------------- speech

def handle_speech(w, req):
    check_key(req)
    body = req.json
    model, text, voice = body.get("model"), body.get("input"), body.get("voice")
    if not isinstance(model, str) or not model:
        raise invalid("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    check_model(req, model)
    if not isinstance(text, str) or not text:
        raise invalid("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if len(text) > 4096:
        raise invalid("Invalid 'input': string too long. Expected a string with maximum length 4096, but got a "
                      "string with length %d instead." % len(text), "input", "string_above_max_length")
    name = voice.get("id") if isinstance(voice, dict) else voice
    if not isinstance(name, str) or not (name in VOICES or isinstance(voice, dict)):
        raise invalid("Invalid value for 'voice': %r. Supported values are: %s, or {\"id\": VOICE_ID}." % (
            clip(str(voice)), ", ".join("'%s'" % v for v in VOICES)), "voice", "invalid_value")
    fmt = body.get("response_format", "mp3")
    if not isinstance(fmt, str) or fmt not in TYPES:
        raise invalid("Invalid value for 'response_format': %r. Supported values are: %s." % (
            clip(str(fmt)), ", ".join("'%s'" % f for f in TYPES)), "response_format", "invalid_value")
    if fmt not in MADE:
        raise invalid("dpmock makes speech as %s (with the standard library only); %s needs an encoder it does "
                      "not have" % (", ".join(MADE), fmt), "response_format", "unsupported_format")
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0.25 <= speed <= 4.0:
        raise invalid("Invalid 'speed': expected a number from 0.25 to 4.0.", "speed", "invalid_value")
    stream = body.get("stream_format", "audio")
    if not isinstance(stream, str) or stream not in ("audio", "sse"):
        raise invalid("Invalid value for 'stream_format': %r. Supported values are: 'sse' and 'audio'." %
                      clip(str(stream)), "stream_format", "invalid_value")
    if stream == "sse" and model not in SSE_MODELS:
        raise invalid("stream_format 'sse' is not supported for model %s (only %s)" % (model, ", ".join(SSE_MODELS)),
                      "stream_format", "unsupported_value")
    pcm = speech_pcm(text, name, speed)
    audio = {"wav": wav, "pcm": lambda p, t: p, "flac": flac, "mp3": mp3}[fmt](pcm, text)
    if stream == "sse":
        w.start_stream(200, "text/event-stream; charset=utf-8")
        for at in range(0, len(audio), 12000):
            w.send_sse_event({"type": "speech.audio.delta", "audio": b64(audio[at:at + 12000])})
        tokens = count_tokens([text])
        w.send_sse_event({"type": "speech.audio.done", "usage": {"input_tokens": tokens, "output_tokens": len(pcm) //
                                                                 960, "total_tokens": tokens + len(pcm) // 960}})
        w.end_stream()
        return
    w.send_bytes(200, audio, TYPES[fmt])


def speech_pcm(text, voice, speed):
    """PCM16 samples: a tone per word (its pitch the voice's), a short silence after each."""
    period = 40 + sum(voice.encode("utf-8")) % 80  #: samples per cycle: 200 to 600 Hz, a whole number of them
    cycle = array.array("h", (int(9000 * math.sin(2 * math.pi * i / period)) for i in range(period)))
    if sys.byteorder == "big":
        cycle.byteswap()
    word = int(RATE * WORD_S / speed) // period * period
    tone = cycle.tobytes() * (word // period)
    gap = bytes(2 * int(RATE * GAP_S / speed))
    words = max(1, len(text.split()))
    most = int(MAX_S * RATE * 2 // (len(tone) + len(gap))) or 1
    return (tone + gap) * min(words, most)


def wav(pcm, text):
    """A RIFF WAVE file: fmt (PCM, mono, 24 kHz, 16 bits), an INFO comment holding the text, the data."""
    comment = text.encode("utf-8") + b"\0"
    comment += b"\0" * (len(comment) % 2)
    info = b"INFO" + b"ICMT" + struct.pack("<I", len(comment)) + comment
    fmt = struct.pack("<HHIIHH", 1, 1, RATE, RATE * 2, 2, 16)
    chunks = (b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", len(info)) + info +
              b"data" + struct.pack("<I", len(pcm)) + pcm)
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def mp3(pcm, text):
    """An ID3v2.4 tag whose title is the text, then silent MPEG-2 Layer III frames (24 kHz, 64 kbps, mono: a
    header and zero side information, 576 samples each) as long as the speech."""
    title = b"\x03" + text.encode("utf-8")
    frame = b"TIT2" + _syncsafe(len(title)) + b"\0\0" + title
    tag = b"ID3\x04\0\0" + _syncsafe(len(frame)) + frame
    frames = max(1, (len(pcm) // 2 + 575) // 576)
    return tag + (b"\xff\xf3\x84\xc0" + bytes(188)) * frames


def _syncsafe(n):
    return bytes(((n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F))


def _crc_table(poly, width):
    """The 256 entries of an MSB-first CRC (FLAC's CRC-8, poly 0x07, and CRC-16, poly 0x8005)."""
    top, mask, table = 1 << (width - 1), (1 << width) - 1, []
    for i in range(256):
        c = i << (width - 8)
        for _ in range(8):
            c = ((c << 1) ^ poly) & mask if c & top else (c << 1) & mask
        table.append(c)
    return table


_CRC8, _CRC16 = _crc_table(0x07, 8), _crc_table(0x8005, 16)  #: made at import (the module loads on first use)


def _crc8(data):
    c = 0
    for b in data:
        c = _CRC8[c ^ b]
    return c


def _crc16(data):
    c, table = 0, _CRC16
    for b in data:
        c = ((c << 8) & 0xFFFF) ^ table[(c >> 8) ^ b]
    return c


def flac(pcm, text):
    """A FLAC stream: STREAMINFO, a Vorbis comment holding the text, then frames of 4096 verbatim samples."""
    samples = len(pcm) // 2
    block = 4096
    info = struct.pack(">HH", block, block) + b"\0" * 6  # block sizes; frame sizes unknown (0)
    info += ((RATE << 44) | (0 << 41) | (15 << 36) | samples).to_bytes(8, "big") + bytes(16)  # MD5 unknown
    vendor, comment = b"dpmock", ("DESCRIPTION=" + text).encode("utf-8")
    vorbis = struct.pack("<I", len(vendor)) + vendor + struct.pack("<II", 1, len(comment)) + comment
    out = [b"fLaC", bytes((0,)) + len(info).to_bytes(3, "big") + info,
           bytes((0x80 | 4,)) + len(vorbis).to_bytes(3, "big") + vorbis]
    big = array.array("h", pcm)
    big.byteswap()  # the PCM is little-endian on every host, FLAC's samples big-endian
    data = big.tobytes()
    for n, start in enumerate(range(0, samples, block)):
        count = min(block, samples - start)
        head = b"\xff\xf8" + bytes(((12 if count == block else 7) << 4 | 0x7, 0x08)) + _utf8_number(n)
        if count != block:
            head += struct.pack(">H", count - 1)
        head += bytes((_crc8(head),))
        frame = head + b"\x02" + data[2 * start:2 * (start + count)]  # subframe: VERBATIM, no wasted bits
        out.append(frame + struct.pack(">H", _crc16(frame)))
    return b"".join(out)


def _utf8_number(n):
    """FLAC's frame number, coded as UTF-8 codes a character."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x800:
        return bytes((0xC0 | n >> 6, 0x80 | n & 0x3F))
    return bytes((0xE0 | n >> 12, 0x80 | (n >> 6) & 0x3F, 0x80 | n & 0x3F))


# ----------------------------------------------------------------------------- transcriptions and translations

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


def handle_transcription(w, req):
    _audio_text(w, req, "transcribe")


def handle_translation(w, req):
    _audio_text(w, req, "translate")


def _audio_text(w, req, task):
    check_key(req)
    fields, files = read_multipart(req, multipart_boundary(req, "multipart/form-data"), keep_files=MAX_AUDIO)
    model = fields.get("model")
    if not model:
        raise invalid("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    check_model(req, model)
    if not files:
        raise invalid("Missing required parameter: 'file'.", "file", "missing_required_parameter")
    name, _, nbytes, _, audio, _ = files[0]
    if audio is False:
        raise HTTPError(413, "Maximum content size limit (%d) exceeded (%d bytes read)" % (MAX_AUDIO, nbytes),
                        param="file", close=True)
    whisper = model.startswith("whisper")
    if task == "translate" and not whisper:
        raise invalid("Invalid model %s: translations take whisper-1" % clip(model), "model", "invalid_value")
    fmt = fields.get("response_format") or "json"
    if fmt not in FORMATS:
        raise invalid("Invalid value for 'response_format': %r. Supported values are: %s." % (
            clip(fmt), ", ".join("'%s'" % f for f in FORMATS)), "response_format", "invalid_value")
    if not whisper and fmt not in ("json", "text"):
        raise invalid("response_format '%s' is not compatible with model '%s'. Use 'json' or 'text'." % (fmt, model),
                      "response_format", "unsupported_value")
    stream = (fields.get("stream") or "false").lower() == "true"
    if stream and whisper:
        raise invalid("Streaming is not supported for the whisper-1 model.", "stream", "unsupported_value")
    duration, said = audio_facts(audio, name)
    text = said if said is not None else "dpmock %s of %s (%.1f seconds of audio)." % (
        "transcript" if task == "transcribe" else "translation", name, duration)
    words = text.split()
    heard, prompt = int(duration * 10), count_tokens([fields["prompt"]]) if fields.get("prompt") else 0
    usage = ({"type": "duration", "seconds": max(1, math.ceil(duration))} if whisper else
             {"type": "tokens", "input_tokens": heard + prompt, "input_token_details": {
                 "text_tokens": prompt, "audio_tokens": heard}, "output_tokens": len(words),
              "total_tokens": heard + prompt + len(words)})
    if stream:
        w.start_stream(200, "text/event-stream; charset=utf-8")
        for i, word in enumerate(words):
            w.send_sse_event({"type": "transcript.text.delta", "delta": word + (" " if i < len(words) - 1 else "")})
        w.send_sse_event({"type": "transcript.text.done", "text": text, "usage": usage})
        w.end_stream()
        return
    segments = _segments(words, duration)
    if fmt == "text":
        w.send_bytes(200, (text + "\n").encode("utf-8"), "text/plain; charset=utf-8")
    elif fmt in ("srt", "vtt"):
        w.send_bytes(200, _captions(segments, fmt).encode("utf-8"), "text/plain; charset=utf-8")
    elif fmt == "verbose_json":
        granularities = fields.get("timestamp_granularities[]") or ["segment"]
        out = {"task": task, "language": "english" if task == "translate" else _language(fields.get("language")),
               "duration": round(duration, 2), "text": text}
        if "segment" in granularities:
            out["segments"] = [{"id": i, "seek": 0, "start": s, "end": e, "text": " " + t, "tokens": [],
                                "temperature": 0.0, "avg_logprob": -0.1, "compression_ratio": 1.0,
                                "no_speech_prob": 0.01} for i, (s, e, t) in enumerate(segments)]
        if "word" in granularities:
            out["words"] = _words(words, duration)
        out["usage"] = usage
        w.send_json(200, out)
    else:
        out = {"text": text, "usage": usage}
        if not whisper and "logprobs" in (fields.get("include[]") or ()):
            out["logprobs"] = [{"token": word, "logprob": -0.01, "bytes": list(word.encode("utf-8"))}
                               for word in words]
        w.send_json(200, out)


_LANGUAGES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian", "ja": "japanese",
              "zh": "chinese", "pt": "portuguese", "nl": "dutch", "ru": "russian", "ko": "korean"}


def _language(code):
    return _LANGUAGES.get((code or "en").lower(), (code or "english").lower())


MAX_SAID = 4096  #: characters of text read back from a file's tag (speech's own input limit)


def audio_facts(data, name):
    """(seconds of audio, the text dpmock's own speech carries, or None) of an uploaded audio file; a header
    that is broken or lies gives the estimate from its size."""
    try:
        seconds, said = _audio_facts(data)
    except (IndexError, struct.error, ValueError, ZeroDivisionError):
        seconds, said = len(data) / 16000.0, None
    return max(0.0, min(seconds, len(data) / 100.0)), said[:MAX_SAID] if said else said


def _audio_facts(data):
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        at, rate, width, frames, said = 12, RATE, 2, None, None
        for _ in range(64):  # chunks looked at: a file of empty chunks is not walked to its end
            if at + 8 > len(data):
                break
            kind, size = data[at:at + 4], struct.unpack("<I", data[at + 4:at + 8])[0]
            chunk = data[at + 8:at + 8 + size]
            if kind == b"fmt " and len(chunk) >= 16:
                channels, rate, _, align = struct.unpack("<HIIH", chunk[2:14])
                width = max(1, align)
            elif kind == b"data":
                frames = min(size, len(data) - at - 8) // width  # no more than the bytes there
            elif kind == b"LIST" and chunk[:4] == b"INFO":
                m = re.search(rb"ICMT(....)", chunk, re.S)
                if m:
                    n = struct.unpack("<I", m.group(1))[0]
                    said = chunk[m.end():m.end() + min(n, 4 * MAX_SAID)].rstrip(b"\0").decode("utf-8", "replace")
            at += 8 + size + size % 2
        return (frames / float(rate or RATE) if frames is not None else len(data) / 48000.0), said
    if data[:4] == b"fLaC" and len(data) >= 42:
        packed = int.from_bytes(data[18:26], "big")
        rate, samples = packed >> 44, packed & ((1 << 36) - 1)
        m = re.search(rb"DESCRIPTION=", data[:70000])
        said = None
        if m:
            n = struct.unpack("<I", data[m.start() - 4:m.start()])[0]
            said = data[m.end():m.start() + min(n, 4 * MAX_SAID)].decode("utf-8", "replace")
        return samples / float(rate or RATE), said
    if data[:3] == b"ID3" and len(data) >= 10:
        size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
        said = None
        if data[10:14] == b"TIT2" and len(data) >= 21:
            n = min((data[14] << 21) | (data[15] << 14) | (data[16] << 7) | data[17], size, 4 * MAX_SAID)
            said = data[21:20 + n].decode("utf-8", "replace")
        frames = max(0, len(data) - 10 - size) // 192
        return frames * 576 / float(RATE), said
    return len(data) / 16000.0, None  # anything else: as a 128 kbps stream


def _segments(words, duration, per=12):
    """(start, end, text) for each run of up to ``per`` words, the time shared evenly."""
    if not words:
        return []
    step = duration / len(words)
    return [(round(i * step, 2), round(min(duration, (i + per) * step), 2), " ".join(words[i:i + per]))
            for i in range(0, len(words), per)]


def _words(words, duration):
    step = duration / max(1, len(words))
    return [{"word": word.strip(".,!?"), "start": round(i * step, 2), "end": round((i + 1) * step, 2)}
            for i, word in enumerate(words)]


def _captions(segments, fmt):
    def stamp(t):
        ms = int(round(t * 1000))
        return "%02d:%02d:%02d%s%03d" % (ms // 3600000, ms // 60000 % 60, ms // 1000 % 60, "," if fmt == "srt" else ".",
                                         ms % 1000)
    lines = [] if fmt == "srt" else ["WEBVTT", ""]
    for i, (start, end, text) in enumerate(segments, 1):
        if fmt == "srt":
            lines.append(str(i))
        lines += ["%s --> %s" % (stamp(start), stamp(end)), text, ""]
    return "\n".join(lines) + "\n"

