"""Magika, as its README uses it: the packaged ONNX model names the content type of byte strings.

The samples are written here: a few kinds of source code, data and document headers. Prints,
per sample, the model's label, the label Magika returns and the score as JSON.

    python magika_app.py
"""

from __future__ import annotations

import json
import zlib

from magika import Magika

PYTHON = b'''import json
import sys


def load(path):
    """Read a JSON file and return its records sorted by id."""
    with open(path) as f:
        records = json.load(f)
    return sorted(records, key=lambda r: r["id"])


if __name__ == "__main__":
    for record in load(sys.argv[1]):
        print(record["id"], record.get("name", "?"))
'''

C_SOURCE = b"""#include <stdio.h>
#include <stdlib.h>

static int compare(const void *a, const void *b) {
    return *(const int *)a - *(const int *)b;
}

int main(int argc, char **argv) {
    int values[64];
    for (int i = 0; i < 64; i++) values[i] = rand() % 1000;
    qsort(values, 64, sizeof(int), compare);
    for (int i = 0; i < 64; i++) printf("%d\\n", values[i]);
    return EXIT_SUCCESS;
}
"""

JSON_DATA = json.dumps(
    [{"id": i, "name": f"sensor-{i}", "readings": [i * 0.5, i * 1.5, i * 2.5]} for i in range(40)],
    indent=2,
).encode()

HTML = b"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Status</title>
<link rel="stylesheet" href="style.css"></head>
<body>
  <h1>Board status</h1>
  <table id="boards">
    <tr><th>name</th><th>soc</th><th>npu</th></tr>
    <tr><td>rock-5b</td><td>rk3588</td><td>6 TOPS</td></tr>
  </table>
  <script src="app.js"></script>
</body>
</html>
"""

SHELL = b"""#!/bin/sh
set -eu
for f in "$@"; do
    if [ -f "$f" ]; then
        echo "compressing $f"
        gzip -9 "$f"
    else
        echo "skipping $f" >&2
    fi
done
"""

CSV = b"id,name,temperature,humidity\n" + b"".join(
    f"{i},station-{i % 7},{15 + (i * 37) % 20}.{i % 10},{40 + (i * 13) % 50}\n".encode()
    for i in range(80)
)

PDF = (
    b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
    b"2 0 obj\n<< /Type /Pages /Kids [3 0 R] /Count 1 >>\nendobj\n"
    b"3 0 obj\n<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>\nendobj\n"
    b"4 0 obj\n<< /Length 44 >>\nstream\nBT /F1 24 Tf 100 700 Td (Hello) Tj ET\nendstream\nendobj\n"
    b"xref\n0 5\n0000000000 65535 f \ntrailer\n<< /Size 5 /Root 1 0 R >>\nstartxref\n0\n%%EOF\n"
)

GZIP = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + zlib.compress(PYTHON * 4)[2:-4] + b"\0" * 8

SAMPLES = {
    "python": PYTHON,
    "c": C_SOURCE,
    "json": JSON_DATA,
    "html": HTML,
    "shell": SHELL,
    "csv": CSV,
    "pdf": PDF,
    "gzip": GZIP,
}


def main() -> None:
    magika = Magika()
    results = {}
    for name, content in SAMPLES.items():
        result = magika.identify_bytes(content)
        results[name] = {
            "dl": str(result.prediction.dl.label),
            "output": str(result.output.label),
            "score": round(float(result.score), 4),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
