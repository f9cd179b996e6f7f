"""The README's walkthrough, adding RLOO as a seventh method, still works on today's grpo.py.

Its patch applies to a copy of grpo.py hunk by hunk (each hunk's old lines found exactly once),
the copy keeps grpo.py's skeleton, the walkthrough's property tests pass on it, and it trains two
steps. So an edit to grpo.py that the walkthrough no longer fits fails here, not in a reader's hands.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from grpo_runs import ON_CPU, ROOT, read_steps
from test_skeleton import skeleton_differences


def walkthrough_block(name: str) -> str:
    """The fenced block that follows `<!-- walkthrough: name -->` in README.md."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- walkthrough: {re.escape(name)} -->\n```\w*\n(.*?)```\n", readme, re.S)
    assert found, f"README.md has no block marked <!-- walkthrough: {name} -->"
    return found.group(1)


def apply_patch(text: str, patch: str) -> str:
    """`text` with each hunk of the unified diff `patch` applied; a hunk's old lines must occur once."""
    hunks = re.split(r"^@@[^\n]*@@\n", patch, flags=re.M)[1:]
    assert hunks, "the walkthrough's patch has no hunks"
    for hunk in hunks:
        lines = hunk.splitlines()
        old = "".join(line[1:] + "\n" for line in lines if line[:1] in (" ", "-"))
        new = "".join(line[1:] + "\n" for line in lines if line[:1] in (" ", "+"))
        assert text.count(old) == 1, f"a hunk of the walkthrough no longer fits grpo.py:\n{old}"
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def rloo_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("walkthrough")
    (folder / "rloo.py").write_text(apply_patch((ROOT / "grpo.py").read_text(), walkthrough_block("rloo.patch")))
    (folder / "test_rloo.py").write_text(walkthrough_block("tests/test_rloo.py"))
    return folder


def test_the_patch_changes_only_what_the_skeleton_allows(rloo_folder):
    rloo = (rloo_folder / "rloo.py").read_text()
    assert "def rloo_advantages(" in rloo and "grpo_advantages" not in rloo
    assert skeleton_differences((ROOT / "grpo.py").read_text(), rloo, "rloo.py") == []


def test_the_walkthrough_property_tests_pass_on_the_patched_copy(rloo_folder):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_rloo.py"],
                            cwd=rloo_folder, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": f"{rloo_folder}{os.pathsep}{ROOT}"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_rloo_trains_two_steps_from_the_patched_copy(rloo_folder, tmp_path):
    shutil.copy(rloo_folder / "rloo.py", tmp_path / "rloo.py")
    result = subprocess.run([sys.executable, "rloo.py", "--total-steps", "2", "--num-prompts", "4", "--group-size", "4",
                             "--eval-size", "8", "--runs-dir", str(tmp_path / "runs"), *ON_CPU],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [run] = list((tmp_path / "runs").iterdir())
    assert run.name.split("__")[1] == "rloo"  # named after its file, as every trainer's runs are
    assert [m["step"] for m in read_steps(run)] == [1, 2]
    assert "scale_by_std" not in json.loads((run / "args.json").read_text())  # the patched Args
