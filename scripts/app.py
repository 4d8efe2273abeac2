"""Serve the rvf web app (upload page + JSON API) with Flask's built-in server.

Usage:
    python scripts/app.py --checkpoint runs/lenet [--host 127.0.0.1] [--port 5000] [--device cpu]
    RVF_CHECKPOINT=runs/lenet python scripts/app.py

Flags default to the environment the gunicorn line below reads: RVF_CHECKPOINT, RVF_DEVICE
and RVF_TORCH_THREADS.

It binds 127.0.0.1 unless told otherwise and never runs in debug mode. For anything beyond
one user, run the same app under gunicorn instead:

    RVF_CHECKPOINT=runs/lenet gunicorn -w 1 --threads 4 -b 127.0.0.1:8000 "rvf.web:create_app()"
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import os  # noqa: E402

from rvf.cli import ALLOW_PICKLE_HELP, port, positive_float, positive_int  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.environ.get("RVF_CHECKPOINT"),
                        help="a run folder (model.safetensors + model.json) or an ensemble folder "
                             "(ensemble.json, written by scripts/ensemble.py --output-dir); default: $RVF_CHECKPOINT")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=port, default=5000, help="1-65535 (default: 5000)")
    parser.add_argument("--device", default=os.environ.get("RVF_DEVICE", "cpu"),
                        help="cpu, cuda or auto (default: $RVF_DEVICE, else cpu)")
    parser.add_argument("--max-upload-mb", type=positive_float, default=10.0, help="request size limit (default: 10)")
    parser.add_argument("--max-image-megapixels", type=positive_float, default=40.0,
                        help="refuse larger images before decoding them (default: 40)")
    parser.add_argument("--max-request-megapixels", type=positive_float, default=160.0,
                        help="pixels per request, all images together; images past it get an error entry "
                             "each (default: 160)")
    parser.add_argument("--min-image-side", type=positive_int, default=32,
                        help="refuse images narrower or shorter than this many pixels (default: 32)")
    parser.add_argument("--threads", type=positive_int, default=os.environ.get("RVF_TORCH_THREADS"),
                        help="torch intra-op threads (default: $RVF_TORCH_THREADS, else torch's: all cores; "
                             "1 is best on shared cores)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help=ALLOW_PICKLE_HELP)
    return parser


def main(args) -> int:
    from rvf.checkpoint import CheckpointError
    from rvf.web import create_app

    try:
        app = create_app({
            "MODEL_CHECKPOINT": args.checkpoint,
            "DEVICE": args.device,
            "MAX_CONTENT_LENGTH": int(args.max_upload_mb * 1024 * 1024),
            "MAX_IMAGE_PIXELS": int(args.max_image_megapixels * 1e6),
            "MAX_REQUEST_PIXELS": int(args.max_request_megapixels * 1e6),
            "MIN_IMAGE_SIDE": args.min_image_side,
            "TORCH_THREADS": args.threads,
            "ALLOW_PICKLE": args.allow_pickle,
        })
    except (CheckpointError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app.run(host=args.host, port=args.port, debug=False, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
