"""Image fidelity table: for each image kind ingest accepts (PNG of every colour type, bit
depth, tRNS kind, interlaced, eXIf; JPEG grey/RGB/CMYK/progressive/orientations 1-8;
WebP; GIF; BMP), the mean absolute difference in grey levels between what ingest stores
(decode_image + resize_image) and Pillow's reference (exif_transpose, alpha on white,
RGB, same resize). The cases and bounds are those of tests/unit/test_image_fidelity.py.

    python benchmarks/image_fidelity.py        # exit status 1 when a case is over its bound
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from test_image_fidelity import print_table  # noqa: E402

if __name__ == "__main__":
    sys.exit(print_table())
