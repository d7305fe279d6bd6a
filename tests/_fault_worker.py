"""Run ``autotransfer`` in a subprocess with a backbone that is slow or hangs.

    python tests/_fault_worker.py --delay S [--hang-stuck] -- search SPEC --storage URL ...

``--delay S``: every training forward sleeps S seconds (so a test can act
between epochs). ``--hang-stuck``: every training forward hangs and ignores
whatever is raised in it (like a call stuck in C code that Python cannot
interrupt). Used by tests/test_worker_faults.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from autotransfer.plugins.host import PluginHost


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--hang-stuck", action="store_true")
    ours, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    real_build = PluginHost.build

    def build(self, ref, **kwargs):
        backbone = real_build(self, ref, **kwargs)
        features = backbone.features

        def slow(model, x):
            if model.training:
                if ours.hang_stuck:
                    while True:
                        try:
                            time.sleep(0.05)
                        except BaseException:  # noqa: BLE001, S110 - the point of the test
                            pass
                time.sleep(ours.delay)
            return features(model, x)

        # No split forward: the trainer would run the blocks through it, not this forward.
        return dataclasses.replace(backbone, features=slow, split=None)

    PluginHost.build = build  # type: ignore[method-assign]
    from autotransfer.cli import app

    sys.argv = ["autotransfer", *rest]
    app()


if __name__ == "__main__":
    main()
