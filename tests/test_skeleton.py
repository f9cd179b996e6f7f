"""Every trainer is grpo.py plus marked method blocks, and nothing else.

Outside its module docstring, the fields of its `Args` dataclass and its marked blocks, a trainer
must be line for line the same as grpo.py. A block runs from a `# ALGO LOGIC: <what changes>` line
to a `# ALGO LOGIC END` line (the method: study these) or from a `# SLOT: <what>` line to a
`# SLOT END` line (the task or plumbing a method fills in: imports, data, evaluation, metrics,
summary). So `diff grpo.py <method>.py` shows the method only, and a plumbing fix made in one
trainer but not in the others fails here, naming the lines.
"""

import difflib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "grpo.py"
TRAINERS = sorted(path for path in ROOT.glob("*.py") if path != TEMPLATE)
BLOCK_START, BLOCK_END = "# ALGO LOGIC:", "# ALGO LOGIC END"
SLOT_START, SLOT_END = "# SLOT:", "# SLOT END"
MARKERS = {BLOCK_START: BLOCK_END, SLOT_START: SLOT_END}  # a block's start -> the end that closes it


def skeleton(text: str) -> list[tuple[int, str]]:
    """The (line number, line) pairs of a trainer outside its marked parts, in order.

    Raises ValueError on a block that never ends or an end with no block open.
    """
    lines = text.splitlines()
    kept, open_end, in_args, index = [], None, False, 0  # open_end: the end marker the open block needs
    if lines and lines[0].startswith('"""'):  # the module docstring
        index = 1 if lines[0].count('"""') >= 2 else next(i for i, line in enumerate(lines[1:], 2) if '"""' in line)
    for number, line in enumerate(lines[index:], index + 1):
        stripped = line.strip()
        start = next((start for start in MARKERS if stripped.startswith(start)), None)
        if start:
            if open_end:
                raise ValueError(f"line {number}: a block starts inside the block that is still open")
            open_end = MARKERS[start]
        elif stripped in MARKERS.values():
            if stripped != open_end:
                raise ValueError(f"line {number}: {stripped} with no block of its kind open")
            open_end = None
        elif line == "class Args:":
            in_args = True
            kept.append((number, line))
        elif in_args and (line.startswith("    ") or not line):
            continue  # the fields of Args (grouped by blank lines and comments) are each method's own
        else:
            in_args = False
            if not open_end:
                kept.append((number, line))
    if open_end:
        raise ValueError(f"a block is still open at the end of the file (missing {open_end})")
    return kept


def skeleton_differences(template_text: str, trainer_text: str, trainer_name: str) -> list[str]:
    """Lines where `trainer_text` leaves grpo.py's skeleton, as a unified diff with line numbers."""
    template, trainer = skeleton(template_text), skeleton(trainer_text)
    matcher = difflib.SequenceMatcher(None, [line for _, line in template], [line for _, line in trainer], autojunk=False)
    report = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        report += [f"grpo.py:{number}: -{line}" for number, line in template[i1:i2]]
        report += [f"{trainer_name}:{number}: +{line}" for number, line in trainer[j1:j2]]
    return report


@pytest.mark.parametrize("trainer", TRAINERS, ids=lambda path: path.name)
def test_trainer_differs_from_grpo_only_inside_marked_blocks(trainer):
    differences = skeleton_differences(TEMPLATE.read_text(), trainer.read_text(), trainer.name)
    assert not differences, (
        f"{trainer.name} leaves grpo.py's skeleton outside its marked blocks; make the same change in "
        f"every trainer, or mark it {BLOCK_START} ... {BLOCK_END}:\n" + "\n".join(differences))


def test_grpo_marks_its_method_blocks_and_its_slots():
    text = TEMPLATE.read_text()
    assert text.count(BLOCK_START) == text.count(BLOCK_END) >= 3
    assert text.count(SLOT_START) == text.count(SLOT_END) >= 3
    assert len(skeleton(text)) < len(text.splitlines())


def test_a_plumbing_change_in_a_copy_is_caught_and_named():
    template = TEMPLATE.read_text()
    [(number, line)] = [(n, line) for n, line in enumerate(template.splitlines(), 1) if "optimizer.zero_grad(" in line]
    changed = line.replace("zero_grad(set_to_none=True)", "zero_grad()")
    broken = template.replace(line, changed)
    assert skeleton_differences(template, broken, "copy.py") == [f"grpo.py:{number}: -{line}", f"copy.py:{number}: +{changed}"]


def test_changes_inside_blocks_docstring_and_args_are_allowed():
    template = TEMPLATE.read_text()
    changed = template.replace('"""GRPO: Group Relative', '"""NEW: a new method on top of Group Relative', 1)
    assert "    seed: int = arg(1," in changed
    changed = changed.replace("    seed: int = arg(1,", '    new_flag: int = arg(3, "a new flag")\n\n    seed: int = arg(2,', 1)
    start = changed.index(BLOCK_START)
    changed = changed[:start] + f"{BLOCK_START} a new estimator\ndef new_estimator():\n    return 0\n{BLOCK_END}\n" + changed[start:]
    slot = changed.index(SLOT_START)
    changed = changed[:slot] + f"{SLOT_START} a new import\nimport math\n{SLOT_END}\n" + changed[slot:]
    assert changed != template and skeleton_differences(template, changed, "copy.py") == []


@pytest.mark.parametrize("text, message", [
    (f"x = 1\n{BLOCK_START} open\ny = 2\n", "still open"),
    (f"x = 1\n{BLOCK_END}\n", "with no block of its kind open"),
    (f"{SLOT_START} a\nx = 1\n{BLOCK_END}\n", "with no block of its kind open"),
    (f"{BLOCK_START} a\n{BLOCK_START} b\n{BLOCK_END}\n", "inside the block"),
])
def test_unbalanced_markers_are_errors(text, message):
    with pytest.raises(ValueError, match=message):
        skeleton(text)
