"""Every results file says where it came from (benchmarks/provenance.py's stamp): the commit, whether the tree was
clean, the device and the command, and that command runs a script that is still in benchmarks/. (`cores` and
`load_average` came later: files written before them need not have them.)"""

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("commit", "tree_clean", "device", "command")

RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def test_there_are_results_to_check():
    assert len(RESULTS) >= 10


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_a_results_file_records_its_provenance(path: Path):
    report = json.loads(path.read_text())
    missing = [key for key in REQUIRED if key not in report]
    assert not missing, f"{path.name} lacks {missing}: regenerate it with its script"
    assert re.fullmatch(r"[0-9a-f]{40}", report["commit"]), report["commit"]
    assert isinstance(report["tree_clean"], bool)
    words = shlex.split(report["command"])
    assert words[0] == "python" and (ROOT / words[1]).is_file(), f"{path.name}: {report['command']!r}"
