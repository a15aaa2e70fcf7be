"""Reading a /predict request under limits: body size, content type, image format, pixel count, decoding, and the
query (class subset, top-k, adapt). Every refusal is a `ServeError` naming the problem, raised before the request
reaches the model, so a refused request never changes the adapted state.

The format is read from the file's magic bytes (the declared content type may lie), and the pixel count from the
header before any pixel is decoded, so a small compressed "decompression bomb" is refused without allocating it.
"""
from __future__ import annotations

import io
import warnings
from typing import Any, AsyncIterator, Sequence

from ctta.serve.options import FORMATS, ServeError, ServeOptions

RAW_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
_OTHER_FORMATS = {b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"\x00\x00\x01\x00": "ICO",
                  b"%PDF": "PDF", b"\x00\x00\x00\x0cjP": "JPEG 2000"}


def sniff(data: bytes) -> str | None:
    """The image format of ``data`` from its first bytes: ``"JPEG"``, ``"PNG"``, ``"WEBP"``, another format's name
    (refused later), or None when it looks like no image at all."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _OTHER_FORMATS.items() if data.startswith(magic)), None)


def resized_pixels(w: int, h: int, side: int) -> int:
    """Pixels of a ``w x h`` image resized so that its shorter side is ``side`` (`Clip.preprocess`, before its
    centre crop): a thin strip grows by ``side / shorter side`` in both directions."""
    short = max(1, min(w, h))
    return round(w * side / short) * round(h * side / short)


def decode_image(data: bytes, options: ServeOptions, what: str = "image", *, side: int | None = None,
                 budget: int | None = None) -> Any:
    """One encoded image -> a loaded PIL image, or a `ServeError`: 400 empty / undecodable, 415 another format,
    413 more pixels than ``options.max_pixels`` (as sent, or once resized to the model's input ``side``), or than
    what is left of the request's ``budget`` (``serve.max_request_pixels``)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ServeError(400, "empty_body", f"{what} is empty (0 bytes)")
    fmt = sniff(data)
    if fmt not in FORMATS:
        found = f"a {fmt} file" if fmt else "not a recognised image"
        raise ServeError(415, "unsupported_format", f"{what} is {found}; accepted formats: JPEG, PNG, WebP")
    try:
        with warnings.catch_warnings():
            # our own limit is checked below from the header; PIL's bomb warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = image.size
            if w * h > options.max_pixels:
                raise ServeError(413, "too_many_pixels", f"{what} is {w}x{h} = {w * h} pixels; the limit is "
                                 f"{options.max_pixels} (serve.max_pixels)")
            if w == 0 or h == 0:
                raise ServeError(400, "decode_error", f"{what} has no pixels ({w}x{h})")
            grown = resized_pixels(w, h, side) if side else 0
            if grown > options.max_pixels:
                raise ServeError(413, "too_many_pixels", f"{what} is {w}x{h}: resized for the model (shorter side "
                                 f"{side}) it would be {grown} pixels; the limit is {options.max_pixels} "
                                 f"(serve.max_pixels): crop it closer to square")
            if budget is not None and w * h > budget:
                raise ServeError(413, "too_many_pixels", f"{what} ({w}x{h}) takes the request over its "
                                 f"{options.max_request_pixels} pixels (serve.max_request_pixels); send fewer or "
                                 f"smaller images per request")
            image.load()  # decode now: a truncated or damaged file fails here, not inside the model's batch
    except ServeError:
        raise
    except Image.DecompressionBombError:  # PIL's own ceiling (a process-wide setting we leave alone) fired first
        limit = min(options.max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0) or options.max_pixels)
        raise ServeError(413, "too_many_pixels", f"{what} declares more than {limit} pixels: over serve.max_pixels "
                         f"({options.max_pixels}) or PIL's decompression-bomb ceiling "
                         f"({2 * (Image.MAX_IMAGE_PIXELS or 0)}), which also binds a larger max_pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ServeError(400, "decode_error", f"{what} cannot be decoded as {fmt}: {e}") from None
    return image


async def read_body(receive_stream: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes: from a declared
    Content-Length before reading anything, else while it streams in (chunked uploads)."""
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ServeError(400, "bad_request", f"Content-Length {declared!r} is not a number") from None
        if n > limit:
            raise ServeError(413, "body_too_large", f"request body is {n} bytes; the limit is {limit} "
                             f"(serve.max_body_bytes)")
    chunks, size = [], 0
    async for chunk in receive_stream:
        size += len(chunk)
        if size > limit:
            raise ServeError(413, "body_too_large", f"request body exceeds {limit} bytes (serve.max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def split_multipart(headers: Any, body: bytes, options: ServeOptions) -> list[tuple[str, bytes]]:
    """The file parts of a multipart/form-data body as ``(name, bytes)``, in order. Text fields are refused (the
    class subset and options go in the query string), as are more files than ``options.max_images``."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(headers, once(), max_files=options.max_images, max_fields=options.max_images,
                             max_part_size=options.max_body_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        text = str(e)
        if "Too many files" in text:
            raise ServeError(413, "too_many_images", f"{text}; at most {options.max_images} images a request "
                             f"(serve.max_images)") from None
        raise ServeError(400, "bad_multipart", f"malformed multipart body: {text}") from None
    parts, fields = [], []
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            parts.append((f"part {key!r} ({getattr(value, 'filename', None) or 'no file name'})", await value.read()))
        else:
            fields.append(key)
    await form.close()
    if fields:
        raise ServeError(400, "bad_multipart", f"multipart text field(s) {fields} are not read; send images as file "
                         f"parts and put classes / top_k / adapt in the query string")
    if not parts:
        if body.rstrip().endswith(b"--"):
            raise ServeError(400, "empty_body", "multipart body holds no image file part")
        raise ServeError(400, "bad_multipart", "malformed multipart body: it ends before its closing boundary "
                         "(truncated?) and holds no complete file part")
    return parts


def content_kind(content_type: str | None) -> str:
    """``"raw"`` (one image as the body) or ``"multipart"``; anything else is 415."""
    base = (content_type or "").split(";")[0].strip().lower()
    if base == "multipart/form-data":
        return "multipart"
    if base in RAW_TYPES or base.startswith("image/") or base == "":
        return "raw"  # the bytes' own signature decides the format (image/gif then gets its 415 by name)
    raise ServeError(415, "unsupported_media_type", f"Content-Type {base!r} is not accepted: send one image as "
                     f"image/jpeg, image/png or image/webp, or several as multipart/form-data")


def parse_query(params: Any, classnames: Sequence[str], default_top_k: int) -> tuple[tuple[str, ...] | None, int, bool]:
    """``(class subset or None, top_k, adapt)`` from the query string: ``classes`` (repeated: ``?classes=cat&
    classes=dog``), ``top_k`` (a positive integer; capped at the number of classes), ``adapt`` (true/false)."""
    unknown = sorted(set(params.keys()) - {"classes", "top_k", "adapt"})
    if unknown:
        raise ServeError(400, "bad_request", f"unknown query parameter(s) {unknown}; accepted: classes, top_k, adapt")
    repeated = [k for k in ("top_k", "adapt") if len(params.getlist(k)) > 1]
    if repeated:
        raise ServeError(400, "bad_request", f"query parameter(s) {repeated} given more than once")
    classes = None
    if "classes" in params:
        names = list(params.getlist("classes"))
        if not any(c.strip() for c in names):
            raise ServeError(400, "empty_classes", "the class subset is empty; give one or more ?classes=NAME, or "
                             "leave classes out to use every class")
        if not all(c.strip() for c in names):
            raise ServeError(400, "empty_classes", "a ?classes= value is empty; name a class in each")
        known = set(classnames)
        missing = [c for c in names if c not in known]
        if missing:
            shown = ", ".join(repr(c) for c in missing[:5])
            raise ServeError(400, "unknown_class", f"unknown class(es) {shown} (this server has "
                             f"{len(classnames)} classes; GET /classes lists them)")
        if len(set(names)) != len(names):
            raise ServeError(400, "duplicate_class", "the class subset names a class twice")
        classes = tuple(names)
    top_k = default_top_k
    if "top_k" in params:
        raw = params.get("top_k")
        if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:  # "²" is a digit to str.isdigit, not to int()
            raise ServeError(400, "bad_request", f"top_k={raw!r}: expected a positive integer")
        top_k = int(raw)
    adapt = True
    if "adapt" in params:
        raw = params.get("adapt").lower()
        if raw not in ("true", "false", "1", "0"):
            raise ServeError(400, "bad_request", f"adapt={params.get('adapt')!r}: expected true or false")
        adapt = raw in ("true", "1")
    n = len(classes) if classes is not None else len(classnames)
    return classes, min(top_k, n), adapt
