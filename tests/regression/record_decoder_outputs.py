"""Record today's outputs of every decoder x task case (``decoder_cases.CASES``) into ``recorded/<case>.pt``.

    .venv/bin/python tests/regression/record_decoder_outputs.py            # every case
    .venv/bin/python tests/regression/record_decoder_outputs.py pft_semantic faseg_semantic

``test_decoder_outputs.py`` reruns each case and requires these outputs back (losses, gradient norms, head
outputs, semantic / panoptic / instance results). Re-record ONLY when a change of behaviour is intended (a fix,
a new default), never to make that test pass after a refactor; the commit that re-records must say so and why
(which cases changed and what changed in them). Each case is checked for degenerate outputs before it is
written (``decoder_cases.check_not_degenerate``): a case that fails is not written and the script exits 1.

Run with one intra-op thread (this script sets it, as tests/conftest.py does for the suite), on the CPU.
"""
import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decoder_cases  # noqa: E402

logger = logging.getLogger("record_decoder_outputs")


def record(case: decoder_cases.Case) -> bool:
    """Run ``case`` and write its recording; False (nothing written) when its outputs are degenerate."""
    start = time.perf_counter()
    result = decoder_cases.run_case(case)
    problems = decoder_cases.check_not_degenerate(case, result)
    if problems:
        logger.error("%s: not recorded, degenerate outputs: %s", case.name, "; ".join(problems))
        return False
    recording = {
        "case": case.name,
        "config": str(case.config.relative_to(decoder_cases.REPO)),
        "opts": list(case.opts),
        "torch_version": torch.__version__,
        "record": result,
    }
    path = decoder_cases.recording_path(case)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(recording, path)
    logger.info("%s: %s in %.1f s -> %s (%.0f KiB)", case.name, decoder_cases.describe(result),
                time.perf_counter() - start, path.relative_to(decoder_cases.REPO), path.stat().st_size / 1024)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"case names (default: all): {', '.join(decoder_cases.CASES_BY_NAME)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.cases if n not in decoder_cases.CASES_BY_NAME]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(decoder_cases.CASES_BY_NAME)}")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cases = [decoder_cases.CASES_BY_NAME[n] for n in args.cases] or decoder_cases.CASES
    ok = [record(case) for case in cases]
    total = sum(p.stat().st_size for p in decoder_cases.RECORDED_DIR.glob("*.pt"))
    logger.info("%d/%d cases recorded; %s holds %.2f MiB", sum(ok), len(ok),
                decoder_cases.RECORDED_DIR.relative_to(decoder_cases.REPO), total / 2 ** 20)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
