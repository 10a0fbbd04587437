"""The rest of vLLM's API on the simulator: embeddings, rerank, score, tokenize, detokenize
and audio transcriptions and translations (multipart, the model named in the form).

Answers are deterministic functions of the input, so tests can compare two backends: an
embedding is the normalised sum of one pseudo-random vector per token (texts sharing words
point the same way, so rerank and score order documents sensibly), a token id is a hash of
the token, a transcript is drawn from a generator seeded with the file's bytes. These
endpoints skip the capacity model: they answer at once.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from affinity_node.sim.prefix_cache import stable_hash, tokenize
from affinity_node.sim.vllm_api import ApiError, chat_prompt

if TYPE_CHECKING:
    from affinity_node.sim.fake_backend import FakeBackend

EMBEDDING_DIM: Final = 64
VOCAB_SIZE: Final = 1 << 17
"""Token ids lie in [0, VOCAB_SIZE), the size of a real model's vocabulary."""
_VOCAB_MEMORY: Final = 100_000
"""Ids a backend remembers for /detokenize (the others decode to `<unk>`)."""
_AUDIO_BYTES_PER_WORD: Final = 16_000
"""About half a second of 16 kHz 16-bit mono per word."""
_AUDIO_WORDS: Final = (
    "hello", "world", "this", "is", "a", "test", "of", "the", "audio", "route",
    "speech", "to", "text", "cache", "node", "backend", "model", "request",
)  # fmt: skip


def _vector(token: str, dim: int) -> list[float]:
    rng = random.Random(stable_hash(token.lower()))
    return [rng.gauss(0.0, 1.0) for _ in range(dim)]


def embed(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """A unit vector from the text's tokens (the zero text gets a fixed unit vector)."""
    total = [0.0] * dim
    for token in tokenize(text):
        for i, x in enumerate(_vector(token, dim)):
            total[i] += x
    norm = math.sqrt(sum(x * x for x in total))
    if norm == 0.0:
        return [1.0] + [0.0] * (dim - 1)
    return [x / norm for x in total]


def similarity(a: str, b: str) -> float:
    """Cosine similarity mapped to 0..1, the range of a reranker's relevance score."""
    cos = sum(x * y for x, y in zip(embed(a), embed(b), strict=True))
    return round((cos + 1.0) / 2.0, 6)


def _texts(value: Any, param: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) for v in value):
            return [" ".join(str(v) for v in value)]  # token ids stand for themselves
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return [" ".join(str(t) for t in v) for v in value]
    raise ApiError(400, f"{param} must be a string or a list of strings", param=param)


def token_id(token: str) -> int:
    return stable_hash(token) % VOCAB_SIZE


class ExtraRoutes:
    """The handlers of one backend."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.vocabulary: dict[int, str] = {}

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/rerank", self.rerank)
        app.router.add_post("/rerank", self.rerank)
        app.router.add_post("/v1/score", self.score)
        app.router.add_post("/score", self.score)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/audio/translations", self.translations)

    async def _body(self, request: web.Request, model_required: bool = True) -> dict[str, Any]:
        body = await self.backend.read_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if body.get("model") is None and not model_required:
            body["model"] = self.backend.served.base[0]
        self.backend.check_model(body.get("model"))
        return body

    def _done(self, body: dict[str, Any]) -> web.Response:
        self.backend.stats.completed += 1
        return web.json_response(body)

    # -- embeddings, rerank, score ---------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            texts = _texts(body.get("input"), "input")
            dim = body.get("dimensions") or EMBEDDING_DIM
            if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 4096:
                raise ApiError(400, "dimensions must be 1..4096", param="dimensions")
            encoding = body.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise ApiError(
                    400, "encoding_format must be float or base64", param="encoding_format"
                )
        except ApiError as exc:
            return exc.response()
        data = []
        for index, text in enumerate(texts):
            vector = embed(text, dim)
            value: Any = vector
            if encoding == "base64":
                value = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(len(tokenize(t)) for t in texts)
        return self._done(
            {
                "id": f"embd-{uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": body["model"],
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def rerank(self, request: web.Request) -> web.Response:
        """Jina/Cohere-style: results sorted by relevance, `top_n` of them."""
        try:
            body = await self._body(request, model_required=False)
            query = body.get("query")
            if not isinstance(query, str):
                raise ApiError(400, "query must be a string", param="query")
            documents = _texts(body.get("documents"), "documents")
            top_n = body.get("top_n") or len(documents)
            if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1:
                raise ApiError(400, "top_n must be a positive integer", param="top_n")
        except ApiError as exc:
            return exc.response()
        results = [
            {"index": i, "document": {"text": d}, "relevance_score": similarity(query, d)}
            for i, d in enumerate(documents)
        ]
        results.sort(key=lambda r: -float(r["relevance_score"]))  # type: ignore[arg-type]
        tokens = sum(len(tokenize(query)) + len(tokenize(d)) for d in documents)
        return self._done(
            {
                "id": f"rerank-{uuid.uuid4().hex}",
                "model": body["model"],
                "usage": {"total_tokens": tokens},
                "results": results[:top_n],
            }
        )

    async def score(self, request: web.Request) -> web.Response:
        """`text_1` against `text_2`: one to many, or pairwise when both are lists."""
        try:
            body = await self._body(request, model_required=False)
            left = _texts(body.get("text_1", body.get("queries")), "text_1")
            right = _texts(body.get("text_2", body.get("documents")), "text_2")
            if len(left) == 1:
                left = left * len(right)
            if len(left) != len(right):
                raise ApiError(400, "text_1 and text_2 must have the same length", param="text_2")
        except ApiError as exc:
            return exc.response()
        data = [
            {"index": i, "object": "score", "score": similarity(a, b)}
            for i, (a, b) in enumerate(zip(left, right, strict=True))
        ]
        tokens = sum(len(tokenize(a)) + len(tokenize(b)) for a, b in zip(left, right, strict=True))
        return self._done(
            {
                "id": f"score-{uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": body["model"],
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
            }
        )

    # -- tokens ----------------------------------------------------------------------------

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request, model_required=False)
            if "messages" in body:
                text = chat_prompt(body.get("messages"))
            elif isinstance(body.get("prompt"), str):
                text = body["prompt"]
            else:
                raise ApiError(400, "prompt (a string) or messages is required", param="prompt")
        except ApiError as exc:
            return exc.response()
        tokens = tokenize(text)
        ids = [token_id(t) for t in tokens]
        for i, t in zip(ids, tokens, strict=True):
            if len(self.vocabulary) < _VOCAB_MEMORY or i in self.vocabulary:
                self.vocabulary[i] = t
        strs = tokens if body.get("return_token_strs") is True else None
        return self._done(
            {
                "count": len(ids),
                "max_model_len": self.backend.cfg.max_model_len,
                "tokens": ids,
                "token_strs": strs,
            }
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        """Token ids back to text (words joined by spaces: the tokenizer keeps no spacing)."""
        try:
            body = await self._body(request, model_required=False)
            ids = body.get("tokens")
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids
            ):
                raise ApiError(400, "tokens must be a list of integers", param="tokens")
            bad = next((i for i in ids if not 0 <= i < VOCAB_SIZE), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} is out of vocabulary", param="tokens")
        except ApiError as exc:
            return exc.response()
        return self._done({"prompt": " ".join(self.vocabulary.get(i, "<unk>") for i in ids)})

    # -- audio -----------------------------------------------------------------------------

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        return await self._audio(request, "transcribe")

    async def translations(self, request: web.Request) -> web.StreamResponse:
        return await self._audio(request, "translate")

    async def _audio(self, request: web.Request, task: str) -> web.StreamResponse:
        self.backend.stats.requests += 1
        try:
            form = await self._form(request)
            self.backend.check_failure()
            model = self.backend.check_model(form.get("model"))
            upload = form.get("file")
            if not isinstance(upload, web.FileField):
                raise ApiError(400, "file is required (multipart form field `file`)", param="file")
            audio = upload.file.read()
            language = form.get("language") if task == "transcribe" else "en"
            fmt = form.get("response_format") or "json"
            if fmt not in ("json", "text", "verbose_json", "srt", "vtt"):
                raise ApiError(400, f"unsupported response_format {fmt!r}", param="response_format")
        except ApiError as exc:
            return exc.response()
        text, duration = transcript(audio)
        self.backend.stats.completed += 1
        if fmt == "text":
            return web.Response(text=text)
        if fmt in ("srt", "vtt"):
            return web.Response(text=subtitles(text, duration, vtt=fmt == "vtt"))
        usage = {"type": "duration", "seconds": math.ceil(duration)}
        if fmt == "json":
            return web.json_response({"text": text, "usage": usage})
        segment = {"id": 0, "seek": 0, "start": 0.0, "end": duration, "text": text, "tokens": []}
        return web.json_response(
            {
                "task": task,
                "language": language if isinstance(language, str) else "en",
                "duration": duration,
                "text": text,
                "segments": [segment],
                "model": model,
            }
        )

    async def _form(self, request: web.Request) -> Any:
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, "audio requests are multipart/form-data", param="file")
        try:
            return await request.post()
        except ValueError as exc:
            raise ApiError(400, f"malformed multipart body: {exc}", param="file") from None


def transcript(audio: bytes) -> tuple[str, float]:
    """(text, duration in seconds), both fixed by the file's bytes."""
    rng = random.Random(int.from_bytes(hashlib.blake2b(audio, digest_size=8).digest(), "big"))
    n_words = max(1, min(200, len(audio) // _AUDIO_BYTES_PER_WORD + 1))
    words: Sequence[str] = [rng.choice(_AUDIO_WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + ".", round(len(audio) / 32_000, 3)


def subtitles(text: str, duration: float, vtt: bool) -> str:
    def stamp(seconds: float) -> str:
        ms = round(seconds * 1000)
        hms = f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}"
        return f"{hms}{'.' if vtt else ','}{ms % 1000:03d}"

    cue = f"{stamp(0.0)} --> {stamp(duration)}\n{text}\n"
    return ("WEBVTT\n\n" + cue) if vtt else ("1\n" + cue)
