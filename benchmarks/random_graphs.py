"""Random Keras functional graphs through wrap -> train step -> strip -> .keras -> LiteRT.

    python benchmarks/random_graphs.py --count 300 --start 0

The grammar and the chain are the test's (`tests/test_random_graphs.py`,
which runs 25 graphs in `make test`). Each graph ends in one of: "ok" (every
link held), "refused" (one ValueError / TypeError from tf_sparsity naming
what it cannot take) or "failed" (anything else: an AttributeError,
KeyError, an output mismatch, a crash of the converter). Prints the seed
range and the counts; results JSON under results/.
"""

import collections
import sys
import tempfile
import traceback
from pathlib import Path

from common import HERE, parser, write_results, RESULTS  # noqa: E402,F401  (first: quiet TensorFlow)

sys.path.insert(0, str(HERE.parent / "tests"))
from test_random_graphs import check_chain  # noqa: E402


def run(seed, folder):
    try:
        check_chain(seed, folder)
        return "ok", ""
    except Exception as error:
        raised_by_us = "/tf_sparsity/" in traceback.extract_tb(error.__traceback__)[-1].filename
        refused = isinstance(error, (ValueError, TypeError)) and raised_by_us
        return ("refused" if refused else "failed"), f"{type(error).__name__}: {str(error)[:300]}"


def main():
    p = parser(__doc__)
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--start", type=int, default=0)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(a.start, a.start + a.count):
            outcome, detail = run(seed, Path(folder))
            rows.append({"seed": seed, "outcome": outcome, "detail": detail})
            if outcome != "ok":
                print(seed, outcome, detail, flush=True)
    counts = collections.Counter(r["outcome"] for r in rows)
    lines = [f"seeds {a.start}..{a.start + a.count - 1}: " + ", ".join(f"{k} {counts[k]}" for k in
                                                                      ("ok", "refused", "failed"))]
    print("\n".join(lines))
    write_results(RESULTS / "random_graphs.json", {"args": vars(a), "rows": rows, "table": lines})


if __name__ == "__main__":
    main()
