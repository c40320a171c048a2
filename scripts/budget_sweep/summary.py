"""Print one line per sweep run: steps, grading and retrieval on the test split (`run.sh` calls this)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(work: Path, names: list[str]) -> None:
    """Read WORK/NAME/run.json and WORK/NAME/eval-test/metrics.json for each run name and print a table."""
    print(f"{'run':32s} {'steps':>6s} {'kappa':>6s} {'AUROC':>6s} {'t>i P@10':>8s} {'t>r P@10':>8s} "
          f"{'t>r R@1':>7s} {'ceil@1':>6s} {'t>i R@10':>8s}")
    for name in names:
        try:
            run = json.loads((work / name / "run.json").read_text())
            metrics = json.loads((work / name / "eval-test" / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError) as error:
            print(f"{name:32s} missing ({error})")
            continue
        record, image = metrics["instance"]["text-record"]["a_to_b"], metrics["instance"]["text-image"]["a_to_b"]
        print(f"{name:32s} {run['steps']:6d} {metrics['icdr']['quadratic_kappa']:6.3f} "
              f"{metrics['referable']['auroc']:6.3f} {metrics['category']['text-image']['P@10']:8.3f} "
              f"{metrics['category']['text-record']['P@10']:8.3f} {record['R@1']:7.3f} "
              f"{record['ceiling@1']:6.3f} {image['R@10']:8.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
