"""What one upload costs the web app: a blank 16-bit PNG of SIDE x SIDE pixels (tiny on the
wire, large in memory) through create_app's test client; prints the status, seconds and peak
RSS growth of the process.

    python benchmarks/upload_cost.py --checkpoint runs/lenet --side 9400     # 88 MP: refused
    python benchmarks/upload_cost.py --checkpoint runs/lenet --side 6000 --gradcam
    python benchmarks/upload_cost.py --checkpoint runs/lenet --side 6300 --files 32   # the request budget
    python benchmarks/upload_cost.py --checkpoint runs/lenet --side 6300 --files 32 --max-request-megapixels 2000

Run it with PYTHONPATH pointing at another checkout to compare versions (session 11 did, on
the commit before the pixel budget: 88 MP took 5.58 s and +2,361 MiB, now a 422 in 0.01 s).
"""
import argparse
import io
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--checkpoint", required=True, help="a run folder the app can serve")
parser.add_argument("--side", type=int, default=9400, help="image side in pixels (default: 9400, 88 MP)")
parser.add_argument("--gradcam", action="store_true", help="ask for the Grad-CAM overlay too")
parser.add_argument("--files", type=int, default=1, help="copies of the image in one request (default: 1)")
parser.add_argument("--max-request-megapixels", type=float, default=None,
                    help="the app's per-request pixel budget (default: the app's own, 160)")
args = parser.parse_args()
if not (Path(args.checkpoint) / "model.json").is_file() and not (Path(args.checkpoint) / "ensemble.json").is_file():
    parser.error(f"--checkpoint {args.checkpoint}: no model.json (or ensemble.json) there: not a run folder")
ckpt, side, gradcam = args.checkpoint, args.side, args.gradcam
sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: another checkout can be measured
from rvf.web import create_app  # noqa: E402

config = {"TESTING": True, "MODEL_CHECKPOINT": ckpt, "TORCH_THREADS": 1}
if args.max_request_megapixels is not None:
    config["MAX_REQUEST_PIXELS"] = int(args.max_request_megapixels * 1e6)
app = create_app(config)
client = app.test_client()
buf = io.BytesIO()
Image.fromarray(np.zeros((side, side), np.uint16)).save(buf, "PNG")
data = buf.getvalue()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
r = client.post("/api/predict" + ("?gradcam=1" if gradcam else ""),
                data={"image": [(io.BytesIO(data), f"deep{i}.png") for i in range(args.files)]},
                content_type="multipart/form-data")
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decoded = sum("label" in x for x in r.json.get("results", []))
print(f"side {side} ({side * side / 1e6:.1f} MP, {len(data) / 1024:.0f} KiB) x {args.files} gradcam={gradcam}: "
      f"HTTP {r.status_code} in {dt:.2f} s, {decoded} classified, peak RSS +{(peak - base) / 1024:.0f} MiB "
      f"| {str(r.json.get('error', ''))[:90]}")
