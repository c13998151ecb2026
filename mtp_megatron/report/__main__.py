"""``python -m mtp_megatron.report RUNS_DIR ...``, as ``python -m mtp_megatron report``."""

import sys

from mtp_megatron.report import main_report

sys.exit(main_report(sys.argv[1:]))
