"""The page and the JSON API.

    GET  /             the upload page
    GET  /api/health   {"status": "ok", "model": ..., "input_size": ..., "threshold": ..., ...}
    POST /api/predict  multipart field `image` (one or more files); `?gradcam=1` (or a form
                       field `gradcam=1`) adds a base64 PNG overlay per image

A predict response is `{"model": name, "results": [...]}` with one entry per file, in order:
`{"filename", "label", "p_fake", "p_real", "threshold"[, "framing"][, "gradcam_png"]}`, or
`{"filename", "threshold", "error"}` for a file that could not be read. "framing" comes when
the model has a framing check (`rvf.framing`): `{"ok", "offset", "correlation"[, "note"]}`,
"ok" false (with a "note" saying why) for a face that does not sit where the training faces sat. The status is 200 when
at least one file was predicted (bad files are error entries beside the good ones) and 422
when none was, with a top-level "error". Malformed requests get 400, oversize uploads 413;
every API error body is `{"error": "..."}`.
"""

from __future__ import annotations

import base64
import io

from flask import Blueprint, current_app, jsonify, render_template, request
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge

from rvf.inference import Detector, Prediction

bp = Blueprint("predict", __name__)

FIELD = "image"
TRUE_VALUES = {"1", "true", "yes", "on"}


def get_predictor() -> Detector:
    """Return the model this app loaded at startup."""
    return current_app.extensions["rvf"]


@bp.get("/")
def index():
    """Show the upload page with the model's name, input size and valid-set metrics."""
    return render_template(
        "index.html",
        info=get_predictor().describe(),
        max_files=current_app.config["MAX_FILES"],
        max_bytes=current_app.config["MAX_CONTENT_LENGTH"],
    )


@bp.get("/api/health")
def health():
    """Report that the model is loaded, and which one."""
    return {"status": "ok", **get_predictor().describe()}


@bp.post("/api/predict")
def predict():
    """Classify every uploaded file; bad files become per-file error entries."""
    files = request.files.getlist(FIELD)  # reading the form enforces MAX_CONTENT_LENGTH (413)
    if not files:
        if FIELD in request.form:  # curl -F image=face.jpg, without the @
            raise BadRequest(f"field {FIELD!r} was sent as text, not as a file (curl: -F {FIELD}=@face.jpg)")
        got = sorted(request.files)
        raise BadRequest(f"expected multipart/form-data with file field {FIELD!r}"
                         + (f", got field(s) {got}" if got else ", got no file"))
    if len(files) > current_app.config["MAX_FILES"]:
        raise BadRequest(f"too many files: {len(files)} (at most {current_app.config['MAX_FILES']} per request)")
    blobs = [(safe_name(f.filename), f.read()) for f in files]
    if not any(f.filename for f in files) and not any(data for _, data in blobs):
        raise BadRequest(f"no file selected: the {FIELD!r} field is empty")  # an empty <input type=file>

    predictor = get_predictor()
    over = over_pixel_budget(blobs, current_app.config["MAX_REQUEST_PIXELS"], current_app.config["MAX_IMAGE_PIXELS"])
    sources = []
    for i, (name, data) in enumerate(blobs):
        if i not in over:
            stream = io.BytesIO(data)
            stream.name = name  # BadImageError messages name the file by this
            sources.append(stream)
    predicted = iter(predictor.predict_sources(
        sources, [s.name for s in sources],
        batch_size=current_app.config["BATCH_SIZE"], gradcam=_flag("gradcam"),
    ))
    results = [Prediction(name=name, threshold=predictor.threshold, error=over[i]) if i in over else next(predicted)
               for i, (name, _) in enumerate(blobs)]
    body = {"model": predictor.model_name, "results": [_result_json(r) for r in results]}
    if not any(r.ok for r in results):
        errors = [r.error for r in results]
        body["error"] = (errors[0] if len(errors) == 1
                         else f"none of the {len(errors)} files could be read: " + "; ".join(errors))
        return body, 422
    return body


def over_pixel_budget(blobs: list[tuple[str, bytes]], budget: int, per_image: int) -> dict[int, str]:
    """Which images, in order, would take the request past `budget` pixels: {index: error}.

    Sizes come from the headers (no decoding). A file whose header cannot be read, or an image
    over `per_image`, costs nothing here: it gets its own error when it is opened for decoding.
    """
    from PIL import Image

    from rvf.data.transforms import IMAGE_FORMATS

    over, spent = {}, 0
    for i, (name, data) in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                pixels = img.width * img.height
        except Exception:  # any unreadable header (damaged files raise struct.error, TypeError... too)
            continue
        if pixels > per_image:
            continue
        if spent + pixels > budget:
            over[i] = (f"{name}: the images before it used this request's {budget / 1e6:g} megapixels; "
                       f"send it in another request")
        else:
            spent += pixels
    return over


def safe_name(raw: str | None) -> str:
    """Return the basename of a client-supplied filename, for display only (never a path)."""
    base = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:200] if base not in ("", ".", "..") else "upload"


def _flag(name: str) -> bool:
    return (request.args.get(name) or request.form.get(name) or "").lower() in TRUE_VALUES


def _result_json(r: Prediction) -> dict:
    d = r.to_dict()
    d["filename"] = d.pop("name")
    if r.gradcam_png is not None:
        d["gradcam_png"] = base64.b64encode(r.gradcam_png).decode("ascii")
    return d


@bp.app_errorhandler(HTTPException)
def api_error(e: HTTPException):
    """Answer API errors (including 404, 405, 413 and 500) with JSON instead of an HTML page."""
    if not request.path.startswith("/api/"):
        return e
    if isinstance(e, RequestEntityTooLarge):
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        # With a Content-Length the size is known up front; a chunked body has none, and it is the
        # stream's own limit that ran out (a LimitedStream at MAX_CONTENT_LENGTH, exhausted).
        length = request.content_length
        if length > limit if length is not None else getattr(request.stream, "is_exhausted", False):
            message = f"upload too large: the limit is {limit / 2**20:g} MB per request"
        else:  # Werkzeug's form limits: too many parts, or a text field too long
            message = (f"too many form fields or files, or a text field too long (at most "
                       f"{current_app.config['MAX_FILES']} files per request)")
    else:
        message = e.description or e.name
    response = jsonify(error=message)
    # The error's own headers but its HTML Content-Type: a 405 must say what is Allowed.
    response.headers.extend((k, v) for k, v in e.get_headers() if k.lower() != "content-type")
    return response, e.code


@bp.after_app_request
def security_headers(response):
    """Let the page load only its own scripts and styles, and stop MIME sniffing."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    )
    return response
