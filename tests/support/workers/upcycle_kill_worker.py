"""Test helper (not a test): a real ``megatron-dpsl-upcycle`` run that stops in the middle of
writing.

``python tests/support/workers/upcycle_kill_worker.py READY_FILE <CLI args>`` runs the CLI; when the
writer asks for layer 1's weights (layer 0 already written into the temporary directory's data
file), it creates READY_FILE and sleeps, so the test can SIGKILL it at a known point. The hook
patches the converter from outside; the package has no test switches.
"""

import sys
import time
from pathlib import Path

from megatron_dpsl.upcycle import cli, plan

ready = Path(sys.argv[1])
real_layer_pieces = plan.layer_pieces


def pieces_then_wait(layer_plan, weights, part="all"):
    if layer_plan.layer == 1 and weights.mlp["linear_fc1.weight"].device.type != "meta":
        ready.write_text("mid-write\n")
        time.sleep(600)  # the test kills us here
    return real_layer_pieces(layer_plan, weights, part)


plan.layer_pieces = pieces_then_wait
sys.exit(cli.main(sys.argv[2:]))
