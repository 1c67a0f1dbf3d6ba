"""Run by tests/test_distributed.py under torchrun (2 processes, gloo) with a 2-second collective
timeout: rank 0 works alone for 4 seconds before each of two waits. `wait_for_main` (rank 0
loading, writing a stage, building the report) must outlast that; a plain collective must not."""

import json
import sys
import time
from pathlib import Path

from mmlens import distributed


def main(out: Path) -> None:
    distributed.init_from_environment(None, collective_timeout_s=2)
    found = {}
    for name, wait in (("wait_for_main", distributed.wait_for_main), ("barrier", distributed.barrier)):
        if distributed.is_main():
            time.sleep(4)
        started = time.perf_counter()
        try:
            wait()
            found[name] = "passed"
        except RuntimeError as error:  # gloo's timeout (torch.distributed.DistError is a RuntimeError)
            found[name] = f"failed: {str(error)[:200]}"
        found[f"{name}_seconds"] = time.perf_counter() - started
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(found))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
